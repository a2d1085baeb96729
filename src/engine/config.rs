//! Client state outside the files themselves: a synced folder's `.dbx/config.toml`, and the
//! user's logins under `$XDG_CONFIG_HOME/dbx/`.
//!
//! Tokens live in the OS keyring; where none is available (CI, containers, a server without a
//! desktop session) or `DBX_KEYRING=file` says so, in `credentials.toml`, created 0600. The list
//! of logins (`logins.toml`, no secrets) records where each token is, so the keyring is asked
//! only for tokens it holds. Several logins (servers, users) coexist; the newest is the default.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::scanner::STATE_DIR;

const KEYRING_SERVICE: &str = "dbx";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot find a home directory: set HOME or XDG_CONFIG_HOME")]
    NoHome,
    #[error(
        "not inside a synced folder (no {STATE_DIR}/ here or above {0}); run `dbx init` first"
    )]
    NotAFolder(PathBuf),
    #[error("keyring: {0}")]
    Keyring(String),
}

type Result<T> = std::result::Result<T, StateError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_toml<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T> {
    match fs::read_to_string(path) {
        Ok(s) => toml::from_str(&s).map_err(|e| StateError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes `value` to `path` atomically (temp file, fsync, rename), with `mode` permissions.
fn write_toml<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<()> {
    let text = toml::to_string(value).map_err(|e| StateError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// A synced folder's settings (`.dbx/config.toml`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FolderConfig {
    /// The server URL.
    pub server: String,
    /// The account this folder syncs as.
    pub user: String,
    /// The server folder this one mirrors, e.g. `/` or `/photos`.
    pub remote: String,
}

/// A synced folder on disk.
#[derive(Clone, Debug)]
pub struct Folder {
    pub root: PathBuf,
    pub config: FolderConfig,
}

impl Folder {
    pub fn state_dir(root: &Path) -> PathBuf {
        root.join(STATE_DIR)
    }

    pub fn index_path(&self) -> PathBuf {
        Self::state_dir(&self.root).join("index.db")
    }

    /// Finds the synced folder holding `start` (or `start` itself), looking upward as git does.
    pub fn find(start: &Path) -> Result<Folder> {
        let start = start.canonicalize().map_err(io_err(start))?;
        let mut dir = start.as_path();
        loop {
            let cfg = Self::state_dir(dir).join("config.toml");
            if cfg.is_file() {
                let config: FolderConfig = read_toml(&cfg)?;
                return Ok(Folder {
                    root: dir.to_path_buf(),
                    config,
                });
            }
            match dir.parent() {
                Some(p) => dir = p,
                None => return Err(StateError::NotAFolder(start)),
            }
        }
    }

    /// Makes `root` a synced folder (creating it if needed).
    pub fn create(root: &Path, config: FolderConfig) -> Result<Folder> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let root = root.canonicalize().map_err(io_err(root))?;
        write_toml(&Self::state_dir(&root).join("config.toml"), &config, 0o644)?;
        Ok(Folder { root, config })
    }

    /// Whether `root` (or a folder above it) is already a synced folder.
    pub fn exists_at_or_above(root: &Path) -> Option<PathBuf> {
        let root = root.canonicalize().ok()?;
        root.ancestors()
            .find(|d| Self::state_dir(d).join("config.toml").is_file())
            .map(Path::to_path_buf)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStore {
    Keyring,
    File,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Login {
    pub server: String,
    pub user: String,
    pub store: TokenStore,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LoginsFile {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    logins: BTreeMap<String, Login>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CredentialsFile {
    #[serde(default)]
    tokens: BTreeMap<String, String>,
}

/// The user's dbx configuration directory.
#[derive(Clone, Debug)]
pub struct ConfigDir {
    pub path: PathBuf,
}

fn login_key(server: &str, user: &str) -> String {
    format!("{user}@{server}")
}

fn force_file_store() -> bool {
    std::env::var("DBX_KEYRING").is_ok_and(|v| v == "file")
}

impl ConfigDir {
    pub fn locate() -> Result<ConfigDir> {
        let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            Some(x) => PathBuf::from(x),
            None => {
                PathBuf::from(std::env::var_os("HOME").ok_or(StateError::NoHome)?).join(".config")
            }
        };
        Ok(ConfigDir {
            path: base.join("dbx"),
        })
    }

    fn logins_path(&self) -> PathBuf {
        self.path.join("logins.toml")
    }

    fn credentials_path(&self) -> PathBuf {
        self.path.join("credentials.toml")
    }

    /// Stores a token for `user` on `server` and makes it the default login.
    pub fn save_login(&self, server: &str, user: &str, token: &str) -> Result<Login> {
        let key = login_key(server, user);
        let store = if force_file_store() {
            TokenStore::File
        } else {
            match keyring::Entry::new(KEYRING_SERVICE, &key).and_then(|e| e.set_password(token)) {
                Ok(()) => TokenStore::Keyring,
                Err(e) => {
                    tracing::info!("no usable OS keyring ({e}); storing the token in a 0600 file");
                    TokenStore::File
                }
            }
        };
        let creds_path = self.credentials_path();
        let mut creds: CredentialsFile = read_toml(&creds_path)?;
        let changed = match store {
            TokenStore::File => {
                creds.tokens.insert(key.clone(), token.to_string());
                true
            }
            TokenStore::Keyring => creds.tokens.remove(&key).is_some(),
        };
        if changed {
            write_toml(&creds_path, &creds, 0o600)?;
        }
        let login = Login {
            server: server.to_string(),
            user: user.to_string(),
            store,
        };
        let mut logins: LoginsFile = read_toml(&self.logins_path())?;
        logins.logins.insert(key.clone(), login.clone());
        logins.default = Some(key);
        write_toml(&self.logins_path(), &logins, 0o644)?;
        Ok(login)
    }

    /// The default login (the newest), if any.
    pub fn default_login(&self) -> Result<Option<Login>> {
        let logins: LoginsFile = read_toml(&self.logins_path())?;
        Ok(logins.default.and_then(|k| logins.logins.get(&k).cloned()))
    }

    /// The login for `user` on `server`, if any.
    pub fn login(&self, server: &str, user: &str) -> Result<Option<Login>> {
        let logins: LoginsFile = read_toml(&self.logins_path())?;
        Ok(logins.logins.get(&login_key(server, user)).cloned())
    }

    /// The token of a login.
    pub fn token(&self, login: &Login) -> Result<Option<String>> {
        let key = login_key(&login.server, &login.user);
        match login.store {
            TokenStore::File => {
                let creds: CredentialsFile = read_toml(&self.credentials_path())?;
                Ok(creds.tokens.get(&key).cloned())
            }
            TokenStore::Keyring => {
                match keyring::Entry::new(KEYRING_SERVICE, &key).and_then(|e| e.get_password()) {
                    Ok(t) => Ok(Some(t)),
                    Err(keyring::Error::NoEntry) => Ok(None),
                    Err(e) => Err(StateError::Keyring(e.to_string())),
                }
            }
        }
    }

    /// Forgets a login and its token.
    pub fn remove_login(&self, server: &str, user: &str) -> Result<bool> {
        let key = login_key(server, user);
        let mut logins: LoginsFile = read_toml(&self.logins_path())?;
        let Some(login) = logins.logins.remove(&key) else {
            return Ok(false);
        };
        match login.store {
            TokenStore::File => {
                let mut creds: CredentialsFile = read_toml(&self.credentials_path())?;
                creds.tokens.remove(&key);
                write_toml(&self.credentials_path(), &creds, 0o600)?;
            }
            TokenStore::Keyring => {
                if let Ok(e) = keyring::Entry::new(KEYRING_SERVICE, &key) {
                    let _ = e.delete_credential();
                }
            }
        }
        if logins.default.as_deref() == Some(key.as_str()) {
            logins.default = logins.logins.keys().next_back().cloned();
        }
        write_toml(&self.logins_path(), &logins, 0o644)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn file_store_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ConfigDir {
            path: dir.path().join("dbx"),
        };
        std::env::set_var("DBX_KEYRING", "file");
        let login = cfg.save_login("http://h:1", "ann", "dbx_secret").unwrap();
        assert_eq!(login.store, TokenStore::File);
        assert_eq!(cfg.token(&login).unwrap().as_deref(), Some("dbx_secret"));
        let mode = fs::metadata(cfg.credentials_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let logins = fs::read_to_string(cfg.logins_path()).unwrap();
        assert!(!logins.contains("dbx_secret"));
        assert_eq!(cfg.default_login().unwrap().unwrap().user, "ann");
        assert!(cfg.remove_login("http://h:1", "ann").unwrap());
        assert!(cfg.default_login().unwrap().is_none());
    }
}
