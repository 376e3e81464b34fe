"""Storage of what runs write and read: atomic files, PNG images, the shard store and its manifest,
readers of any distilled set, stored soft labels. One module per job; import from them."""
