"""The host half: plain Python and numpy, no JAX (a test imports every module with JAX blocked).

`request` (requests, sampling parameters, outputs), `slots` (the one owner of per-slot state),
`scheduler` (admission, growth, preemption, the step plan), `pager` (the block pager), `static`
(the static baseline's reservation, same interface as the pager), `tier` (host memory tier
bookkeeping and placement policies), `summaries` (far-history summary planning), `stats`.
"""
