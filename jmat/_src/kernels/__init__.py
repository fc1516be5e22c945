"""The backends of the block-sparse attention kernel (jmat._src.block_sparse), one file each."""
