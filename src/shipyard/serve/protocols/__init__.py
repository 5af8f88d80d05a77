"""Protocol adapters over the shared inference core: KServe V2 (tensors) and simple JSON."""
