"""The application layer (installed as `avatar.app`): the `avatar` CLI, `serve`, `batch`, the
weight tools, the GPU monitor and the container health check. It sits on top of everything:
nothing below it imports it."""
