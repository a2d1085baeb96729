//! Passwords (argon2id), bearer tokens (random, stored as SHA-256), and the extractor that turns
//! an `Authorization` header into the calling user. Secrets never reach logs or `Debug` output.

use std::sync::Arc;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::blobs::BlobStore;
use super::error::ApiError;
use super::store::{Actor, MetaStore, User};
use super::App;

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new random secret: `prefix` then 32 random bytes in hex.
pub fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// What the server stores for a token.
pub fn token_hash(token: &str) -> String {
    crate::protocol::block_hash(token.as_bytes())
}

/// The authenticated caller of a request.
pub struct Caller {
    pub user: User,
    pub device: Option<String>,
}

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor {
            user_id: self.user.id,
            device: self.device.clone(),
        }
    }
}

impl<M: MetaStore, B: BlobStore> FromRequestParts<Arc<App<M, B>>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App<M, B>>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthorized("missing bearer token; log in with `dbx login`".into())
            })?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::Unauthorized("expected `Authorization: Bearer TOKEN`".into()))?
            .trim();
        let found = app.store.user_by_token(&token_hash(token)).await?;
        match found {
            Some((user, _)) if user.disabled => Err(ApiError::Unauthorized(format!(
                "user {} is disabled",
                user.name
            ))),
            Some((user, device)) => Ok(Caller { user, device }),
            None => Err(ApiError::Unauthorized(
                "invalid or revoked token; run `dbx login` again".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn secrets_are_random() {
        assert_ne!(random_secret("dbx_"), random_secret("dbx_"));
        assert_eq!(random_secret("dbx_").len(), 4 + 64);
    }
}
