"""longctx_compiler: compiler passes for long-context training."""
