"""The loraswap HTTP service: a Litestar app that keeps one base model resident and generates images."""
