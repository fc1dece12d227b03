"""The teacher cache: format (layout, manifest, checksums), writer and reader."""
