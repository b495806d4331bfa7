"""A module's training forward and backward replayed from two CUDA graphs (train.cuda_graph).

A DiT-XL/2 training step issues over a thousand kernels from Python. Where the host takes longer to issue
them than the GPU takes to run them (small micro-batches; the start of a forward after a synchronising
optimizer step) the GPU waits. Captured once in CUDA graphs, the forward and the backward are each
one replay call.

    install(model)            # model.forward becomes a GraphedForward; the class, the state dict and the
                              # parameters are untouched; uninstall(model) restores the original forward
    loss = loss_fn(model(x, t, y))   # first training call: warm-up on a side stream, then the capture
    loss.backward()                  # the backward graph; the gradients reach .grad through autograd as usual

The first training call with a given input signature (shapes, dtypes, devices, non-tensor arguments,
autocast off) warms the forward + backward up on a side stream, then captures the forward and
`torch.autograd.grad` over the parameters as two graphs sharing one memory pool. From then on each such
call copies its inputs into the captured input buffers and replays the forward; the backward copies the
incoming gradient in and replays the backward, whose parameter gradients go to autograd, so gradient
hooks (DeepSpeed's bucketing and reduction) and accumulation run as without graphs. Every other call runs
the original forward: grad disabled, eval mode, an input that requires grad, autocast on, or another
signature than the captured one (said once).

What the graphs cannot follow is checked instead of trusted:
* the parameters must keep their storage (an optimizer updates them in place); a parameter that moved
  since the capture is an error, never a replay reading freed memory;
* a forward's activations live in the graph's pool, so a second forward overwrites the first's: the
  backward of a replaced forward is an error;
* the parameter gradients are the backward graph's output buffers. When a parameter's .grad is unset,
  autograd may take the buffer itself as .grad instead of a copy (PyTorch issue 181723, the same hazard in
  torch.cuda.make_graphed_callables), and the next replay would then overwrite an accumulated gradient:
  the backward's replay rewrites those buffers, and so may the forward's (the two graphs share one pool,
  and the backward's capture can place its gradients in blocks the forward's freed activations left).
  Before each replay, forward or backward, a .grad that still shares its buffer is cloned, so accumulation
  over micro-batches stays exact (the CPU emulation fills the backward's outputs with NaN at each forward
  replay, the worst case, so the tests see it). Where .grad is emptied after each backward this costs nothing; where it
  accumulates across micro-batches (DeepSpeed ZeRO-1 with gradient accumulation: without the clone a 2-rank
  test trains differently) it is one copy of the gradients per optimizer step;
* the random stream: the warm-up's draws are undone (the CPU and CUDA generators are restored before the
  capture), and the graph draws from the default CUDA generator at each replay, so a graphed run's label
  dropout is the eager run's.

Off CUDA there are no graphs: `emulate=True` stands a recorder in for them (capture runs the call and keeps
it; replay runs it again and copies the results into the captured buffers). The static-buffer logic above
then runs on the CPU, so tests can check it; it saves no time.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fastdit.dist import say

WARMUP_CALLS = 3   # forward + backward on a side stream before the capture (Triton compiles, cuBLAS picks)


class GraphCaptureError(RuntimeError):
    """The forward or backward could not be captured (an op that synchronises or is not capturable): nothing
    was trained with graphs; the run can go on without them (train.cuda_graph=false)."""


def capture_in(ctx, fn: Callable[[], Any], restore_stream: Callable[[], None]) -> Any:
    """fn() inside the capture context `ctx` (a torch.cuda.graph). Where fn raises (an op that synchronises or
    cannot be captured), the capture is ended anyway and its own error (an invalidated capture, the symptom)
    dropped, the stream the caller was on is put back (torch.cuda.graph's exit restores it only after a capture
    that ends cleanly), and fn's error, the cause, goes on."""
    ctx.__enter__()
    try:
        out = fn()
    except BaseException:
        try:
            ctx.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - the symptom of fn's error, which is the one raised
            pass
        restore_stream()
        raise
    ctx.__exit__(None, None, None)
    return out


class _CudaGraphs:
    """The forward and backward CUDA graphs of one GraphedForward, in one memory pool."""
    emulated = False

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs = {"forward": torch.cuda.CUDAGraph(), "backward": torch.cuda.CUDAGraph()}
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable[[], None], calls: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(calls):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def capture(self, name: str, fn: Callable[[], Any]) -> Any:
        # thread_local: a DataLoader's pin-memory thread may call CUDA during the capture
        stream = torch.cuda.current_stream(self.device)
        ctx = torch.cuda.graph(self.graphs[name], pool=self.pool, capture_error_mode="thread_local")
        return capture_in(ctx, fn, lambda: torch.cuda.set_stream(stream))

    def replay(self, name: str) -> None:
        self.graphs[name].replay()


class EmulatedGraphs:
    """A CPU stand-in for _CudaGraphs: capture runs `fn` once and keeps it with its results; replay runs it
    again (gradients on for the forward) and copies the new results into the kept ones, which is what a
    graph's replay does to its output buffers."""
    emulated = True

    def __init__(self, device: torch.device):
        self.device = device
        self.fns: Dict[str, Callable[[], Any]] = {}
        self.outputs: Dict[str, Any] = {}

    def warm_up(self, fn: Callable[[], None], calls: int) -> None:
        for _ in range(calls):
            fn()

    def capture(self, name: str, fn: Callable[[], Any]) -> Any:
        # a graph's capture draws no random numbers (its draws happen at each replay): neither does this
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        out = fn()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.fns[name], self.outputs[name] = fn, out
        return out

    def replay(self, name: str) -> None:
        if name == "forward" and "backward" in self.outputs:
            # the CUDA graphs share one pool: the forward's replay may overwrite the backward's output buffers
            # (the worst case, made visible)
            for kept in _as_list(self.outputs["backward"]):
                if kept is not None and kept.is_floating_point():
                    kept.detach().fill_(float("nan"))
        with torch.enable_grad():
            new = self.fns[name]()
        old = self.outputs[name]
        for kept, fresh in zip(_as_list(old), _as_list(new)):
            if kept is not None:
                kept.detach().copy_(fresh.detach())


def _as_list(x) -> List[Optional[torch.Tensor]]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


class _Replay(torch.autograd.Function):
    """autograd's view of one replay: inputs and parameters in, the module's output out; the backward
    replays the backward graph and hands autograd the parameter gradients."""

    @staticmethod
    def forward(ctx, runner: "GraphedForward", n_inputs: int, *inputs_and_params):
        ctx.runner = runner
        ctx.generation = runner._replay_forward(inputs_and_params[:n_inputs])
        ctx.n_inputs = n_inputs
        return runner._static_out.clone()   # the buffer is overwritten by the next replay; this is not

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.runner._replay_backward(grad_out, ctx.generation)
        return (None, None) + (None,) * ctx.n_inputs + grads


class GraphedForward:
    """Stands in for `module.forward` (see the module docstring); `install` puts it there."""

    def __init__(self, module: nn.Module, *, emulate: bool = False, warmup_calls: int = WARMUP_CALLS,
                 backend: Optional[Callable[[torch.device], Any]] = None):
        self.module = module
        self.backend = backend    # device -> graphs object (warm_up / capture / replay); None: CUDA or emulated
        self.original = type(module).forward.__get__(module)   # the class's forward, bound
        self.signature = inspect.signature(self.original)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in self.signature.parameters.values()):
            raise ValueError(f"{type(module).__name__}.forward takes *args or **kwargs: no fixed argument list to "
                             f"capture")
        self.emulate = emulate
        self.warmup_calls = warmup_calls
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.graphs = None
        self.key = None
        self.generation = 0
        self.captures = 0        # for reports and tests
        self.replays = 0
        self.eager_calls = 0
        self._said = set()

    # --------------------------------------------------------------------------- dispatch
    def _call_key(self, args: Tuple[Any, ...]):
        """(the input signature, None) for a call the graphs can take; (None, why) for a training call they
        cannot (said once per reason); (None, None) for a call that is not a training call (eval, no grad)."""
        if not (self.module.training and torch.is_grad_enabled()):
            return None, None
        if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
            return None, "autocast is on (the graphs hold a fixed kernel sequence; autocast caches casts)"
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.requires_grad:
                    return None, "an input requires a gradient (the graphs differentiate the parameters only)"
                key.append((tuple(a.shape), a.dtype, a.device))
            elif a is None or isinstance(a, (bool, int, float, str)):
                key.append(("value", a))
            else:
                return None, f"an argument of type {type(a).__name__} (the graphs take tensors and plain values)"
        return tuple(key), None

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            say(message)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call_args = tuple(bound.arguments.values())
        key, why = self._call_key(call_args)
        if key is None:
            if why is not None:
                self._say_once(f"graphed forward: training calls run without graphs while {why}")
            return self._eager(args, kwargs)
        if self.graphs is None:
            self._capture(call_args, key)
        elif key != self.key:
            self._say_once(f"graphed forward: a call with inputs {_describe(key)} runs without graphs while the "
                           f"graphs hold {_describe(self.key)}")
            return self._eager(args, kwargs)
        tensors = [a for a in call_args if isinstance(a, torch.Tensor)]
        return _Replay.apply(self, len(tensors), *tensors, *self.params)

    def _eager(self, args, kwargs):
        self.eager_calls += 1
        return self.original(*args, **kwargs)

    # --------------------------------------------------------------------------- capture
    def _capture(self, call_args: Tuple[Any, ...], key) -> None:
        device = next((a.device for a in call_args if isinstance(a, torch.Tensor)), None)
        if device is None:
            raise ValueError("graphed forward: the call has no tensor input")
        if self.backend is None and not self.emulate and device.type != "cuda":
            raise ValueError(f"graphed forward: CUDA graphs need CUDA inputs, got {device.type} "
                             f"(emulate=True runs the same logic without graphs, for tests)")
        graphs = (self.backend(device) if self.backend is not None else
                  EmulatedGraphs(device) if self.emulate else _CudaGraphs(device))
        # the captured inputs: own buffers, so a caller's tensor is never written
        static_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in call_args]
        self._static_in = [a for a in static_args if isinstance(a, torch.Tensor)]
        params = self.params

        def forward():
            out = self.original(*static_args)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"graphed forward: the module must return one tensor, got {type(out).__name__}")
            return out

        def warm_step():
            out = forward()
            torch.autograd.grad(out, params, torch.zeros_like(out), allow_unused=True)

        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            with torch.enable_grad():
                graphs.warm_up(warm_step, self.warmup_calls)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, device)
                torch.set_rng_state(cpu_rng)

                def capture_forward():
                    self._live_out = forward()
                    return self._live_out
                self._static_out = graphs.capture("forward", capture_forward).detach()
                self._static_grad_out = torch.zeros_like(self._static_out)

                def capture_backward():
                    return torch.autograd.grad(self._live_out, params, self._static_grad_out, allow_unused=True)
                self._static_grads = tuple(graphs.capture("backward", capture_backward))
        except Exception as e:
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
            torch.set_rng_state(cpu_rng)
            raise GraphCaptureError(f"graphed forward: capturing the forward and backward failed "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"run without graphs (train.cuda_graph=false)") from e
        if not getattr(graphs, "emulated", False):
            self._live_out = None      # the captured autograd graph is not needed after the capture
        self._grad_ptrs = [g.data_ptr() if g is not None else None for g in self._static_grads]
        self._param_ptrs = [p.data_ptr() for p in params]
        self.graphs, self.key = graphs, key
        self.captures += 1

    # --------------------------------------------------------------------------- replay
    def _replay_forward(self, inputs: Sequence[torch.Tensor]) -> int:
        if [p.data_ptr() for p in self.params] != self._param_ptrs:
            moved = sum(p.data_ptr() != q for p, q in zip(self.params, self._param_ptrs))
            raise RuntimeError(f"graphed forward: {moved} parameter(s) changed storage since the capture; the "
                               f"graphs would read the old memory (update parameters in place, or run "
                               f"without graphs: train.cuda_graph=false)")
        self._keep_aliased_grads()   # the forward's activations may sit where the backward's outputs were
        for buf, x in zip(self._static_in, inputs):
            if buf.data_ptr() != x.data_ptr():
                buf.copy_(x)
        self.graphs.replay("forward")
        self.generation += 1
        self.replays += 1
        return self.generation

    def _keep_aliased_grads(self) -> None:
        """Clone each .grad that is the backward graph's output buffer itself, before a replay writes that memory:
        the backward's replay rewrites its outputs, and the forward's replay may too (the two graphs share one
        pool, and the backward's capture can take its gradients' blocks from activations freed during it)."""
        for p, ptr in zip(self.params, self._grad_ptrs):
            g = p.grad
            if g is not None and ptr is not None and g.data_ptr() == ptr:
                p.grad = g.clone()

    def _replay_backward(self, grad_out: Optional[torch.Tensor], generation: int):
        if generation != self.generation:
            raise RuntimeError("graphed forward: this backward belongs to a forward whose activations a later "
                               "forward call replaced; run each forward's backward before the next forward")
        self._keep_aliased_grads()
        if grad_out is None:
            self._static_grad_out.zero_()
        else:
            self._static_grad_out.copy_(grad_out)
        self.graphs.replay("backward")
        return tuple(g.detach() if g is not None else None for g in self._static_grads)


def _describe(key) -> str:
    return ", ".join(f"{tuple(k[0])} {str(k[1]).replace('torch.', '')}" if k[0] != "value" else repr(k[1])
                     for k in key)


def install(module: nn.Module, *, emulate: bool = False, warmup_calls: int = WARMUP_CALLS,
            backend: Optional[Callable[[torch.device], Any]] = None) -> GraphedForward:
    """Make `module(...)` run through a GraphedForward (an instance attribute `forward`; the class is
    untouched). Returns it. Raises ValueError when the module's forward is already replaced. `backend`
    (device -> an object with warm_up / capture / replay, as _CudaGraphs) replaces the graphs, e.g. in a
    benchmark of the host path."""
    if "forward" in vars(module):
        raise ValueError(f"{type(module).__name__}.forward is already replaced on this instance")
    graphed = GraphedForward(module, emulate=emulate, warmup_calls=warmup_calls, backend=backend)
    module.forward = graphed
    return graphed


def install_for(module: nn.Module, device: torch.device) -> GraphedForward:
    """install() as the training loop and the benchmark rows use it: CUDA graphs on a CUDA device, the emulation
    anywhere else (the same buffers and checks, no speed-up); `mode(...)` says which."""
    return install(module, emulate=device.type != "cuda")


def mode(graphed: Optional[GraphedForward]) -> Optional[str]:
    """What a run reports: None (no graphs installed), "cuda" or "emulated (no CUDA device)"."""
    if graphed is None:
        return None
    return "emulated (no CUDA device)" if graphed.emulate else "cuda"


def uninstall(module: nn.Module) -> None:
    """Restore the class's forward (drops the graphs and their memory pool)."""
    if isinstance(vars(module).get("forward"), GraphedForward):
        del module.forward


def installed(module: nn.Module) -> Optional[GraphedForward]:
    f = vars(module).get("forward")
    return f if isinstance(f, GraphedForward) else None
