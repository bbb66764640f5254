"""The device half: pure functions traced into the compiled steps, no Python state between calls.

`steps` (the decode and prefill steps, compile counting), `attention` (the attention switch:
reference / pallas / interpret), `sampling`, `block_ops` (KV writes, block copies, summary folds),
`tier` (host pools, swap op, staging), `summaries` (merging summary rows), `sharding` (the mesh),
`gemm` (who runs the projection GEMMs).
"""
