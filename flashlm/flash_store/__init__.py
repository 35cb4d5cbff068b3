"""On-disk flash store (row-column bundled FFN records) and its I/O engine. Filled by the flash-store issue."""
