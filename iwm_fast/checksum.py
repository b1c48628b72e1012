"""The file checksum shared by checkpoints and shard manifests: XXH3-128, read in 8 MiB chunks. It guards
against accidental damage, not an adversary, and hashes several times faster than SHA-256."""
HASH = "xxh3_128"  # the key a record stores the digest under
_CHUNK = 8 << 20


def hash_file(path):
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
