-- BLAKE3 fingerprints (128-bit, hex, comma-separated, in block order) of each synced file's
-- blocks, so an edited big file re-hashes only the chunks that changed. Empty: unknown.
ALTER TABLE entries ADD COLUMN block_fps TEXT NOT NULL DEFAULT '';
