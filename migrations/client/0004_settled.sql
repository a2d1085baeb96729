-- Directions in which the last run left nothing to do: with the local files as the index
-- records them and the stored remote tree as of the stored cursor, a run in that direction
-- plans nothing. A later run that finds no local change and no journal row past the cursor
-- stops there, without loading either tree. Every write to the index or the stored remote
-- tree deletes these rows first; only a run that checked its outcome writes one.
CREATE TABLE settled (
    direction TEXT PRIMARY KEY,
    -- The folder's remote root the run synced with (a changed config invalidates the row).
    remote_root TEXT NOT NULL
);
