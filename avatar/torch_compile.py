"""torch.compile in a service process, where several threads run models at once."""


def tolerate_tracing_in_other_threads() -> None:
    """While torch.compile traces a graph in one thread (make_fx), FX's "tracing" flag is set for
    the whole process, and a compiled model called meanwhile from another thread raises "Detected
    that you are using FX to symbolically trace a dynamo-optimized function" (it broke a request
    on an H100 in `avatar serve --role all`, docs/operations.md). With this, such a call runs its
    module eagerly instead, for as long as the other thread traces."""
    import torch._dynamo

    torch._dynamo.config.error_on_nested_fx_trace = False
