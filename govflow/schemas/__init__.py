"""The wire formats and settings of govflow: msgspec Structs and their codecs."""
