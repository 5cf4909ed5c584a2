"""shardps benchmarks: each `python -m bench.NAME` measures shardps against a baseline run in the
same invocation, prints a table and writes JSON to bench/out/NAME.json (see bench/RESULTS.md).

  wire   push + pull between one worker and S servers vs raw TCP sockets (and bare gRPC)
  apply  server-side Adam through the real push path vs fused torch.optim.Adam in-process
  step   one training step split into pull / compute / push / wait vs the same step alone
  tta    time to the digits target: shardps local vs single-process torch vs DDP over gloo
  scale  the largest model 4 servers train here, with each server's resident memory

Every script takes --small: a configuration that runs in seconds (CI runs them that way,
tests/integration/test_bench_smoke.py), with no claim about speed.
"""
