"""Provider detection and parsers: pure functions over bytes, no I/O."""
