"""Speed and memory benchmarks of minidp against deepmd-kit (see benchmarks/README.md)."""
