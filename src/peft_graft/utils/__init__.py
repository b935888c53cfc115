"""Small I/O helpers shared by the package: atomic writes, JSON files, safetensors headers."""
