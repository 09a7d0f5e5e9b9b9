"""Storage and input: URIs through fsspec, conditional writes, image decoding, source readers, redaction, ids."""
