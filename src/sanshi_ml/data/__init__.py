"""Files in and out: reading exports, the record schema, writing outputs."""
