"""The disk: the store, its index, blobs written and read back checked, inventory, removals."""
