"""Pallas kernels of the KV-RM runtime: paged decode attention and block copy."""
from pallas_kernels.block_copy import copy_blocks, copy_blocks_reference
from pallas_kernels.paged_attention import (paged_decode_attention,
                                            paged_decode_attention_reference)
from pallas_kernels.partition import KVPartition, build_descriptors, make_transfer_groups

__all__ = ["copy_blocks", "copy_blocks_reference", "paged_decode_attention",
           "paged_decode_attention_reference", "KVPartition", "build_descriptors",
           "make_transfer_groups"]
