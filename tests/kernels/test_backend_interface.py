"""The three kernel backends keep one interface: the same public names with the same signatures.

:mod:`kernels.reference` is the specification; :mod:`kernels.cpu` and :mod:`kernels.cuda` mirror
it name for name, so code written against one backend runs on the others. A public function
added to, renamed in or re-parametrised in one backend only fails here, naming the function.

Signatures are compared by parameter name, kind and default. Annotations are not compared: the
CUDA backend takes device arrays where the others take NumPy arrays. Numba dispatchers are
compared through their Python function (``py_func``).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import pytest

import kernels.cpu
import kernels.cuda
import kernels.reference

BACKENDS = {"reference": kernels.reference, "cpu": kernels.cpu, "cuda": kernels.cuda}

# Public helpers that belong to the compiled backends only, never to the specification:
# ``act_code`` turns an activation name into the integer their jitted cores take, ``require``
# raises BackendUnavailable (with the fix) where CUDA cannot run, ``bind_thread`` puts the calling
# thread on one of the visible GPUs.
BACKEND_ONLY = {"act_code": {"cpu", "cuda"}, "require": {"cuda"}, "bind_thread": {"cuda"}}


def _function(obj: Any) -> Any:
    return getattr(obj, "py_func", obj)


def public_functions(module: types.ModuleType) -> dict[str, inspect.Signature]:
    """Public functions ``module`` defines or re-exports from the kernels package, by name."""
    out = {}
    for name, obj in vars(module).items():
        fn = _function(obj)
        if name.startswith("_") or isinstance(obj, type) or not callable(fn):
            continue
        if not getattr(fn, "__module__", "").startswith("kernels"):
            continue  # imported tools (numba.njit, typing.Any), not part of the interface
        out[name] = inspect.signature(fn)
    return out


def _shape(sig: inspect.Signature) -> list[tuple[str, str, Any]]:
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


def interface_differences(modules: dict[str, types.ModuleType], backend_only: dict[str, set[str]]) -> list[str]:
    """One line per public name that is missing somewhere or whose signature differs."""
    funcs = {label: public_functions(m) for label, m in modules.items()}
    problems = []
    for name in sorted(set().union(*funcs.values())):
        have = {label for label, f in funcs.items() if name in f}
        want = backend_only.get(name, set(modules))
        if have != want:
            problems.append(
                f"{name}: defined in {sorted(have)} but expected in {sorted(want)}"
                + ("" if name in backend_only else " (every kernel is in all backends)")
            )
            continue
        shapes = {label: _shape(funcs[label][name]) for label in sorted(have)}
        if len({repr(s) for s in shapes.values()}) > 1:
            problems.append(
                f"{name}: signatures differ: " + "; ".join(f"{label}{funcs[label][name]}" for label in sorted(have))
            )
    return problems


def test_backends_export_the_same_functions_with_the_same_signatures():
    problems = interface_differences(BACKENDS, BACKEND_ONLY)
    assert not problems, "kernel backends disagree:\n  " + "\n  ".join(problems)


def test_backends_cover_every_kernel_of_the_specification():
    spec = public_functions(kernels.reference)
    # the interface the model code calls (guards against an empty or half-read listing)
    assert {
        "gemm",
        "dense_forward",
        "dense_backward",
        "softmax_cross_entropy",
        "adam_update",
        "to_device",
        "to_host",
    } <= set(spec)
    for label, module in BACKENDS.items():
        assert set(spec) <= set(public_functions(module)), label


def test_backends_share_the_activation_names_and_codes():
    for module in (kernels.cpu, kernels.cuda):
        assert module.ACTIVATIONS == kernels.reference.ACTIVATIONS, module.__name__
        codes = [module.act_code(a) for a in module.ACTIVATIONS]
        assert codes == [module.IDENTITY, module.SIGMOID, module.TANH, module.RELU, module.LEAKY_RELU, module.STEP], (
            module.__name__
        )


def _fake(name: str, **funcs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for fname, fn in funcs.items():
        fn.__module__ = "kernels.fake"
        setattr(mod, fname, fn)
    return mod


def test_a_differing_signature_or_missing_kernel_is_named():
    from numba import njit

    def gemm(out, a, b, trans_a=False, trans_b=False): ...
    def gemm_other(out, a, b, trans_b=False, trans_a=False): ...
    def gemm_jit(out, a, b, trans_a=False, trans_b=True):
        return None

    def softmax(out, logits): ...

    spec = _fake("spec", gemm=gemm, softmax=softmax)
    swapped = _fake("swapped", gemm=gemm_other, softmax=softmax)
    problems = interface_differences({"spec": spec, "swapped": swapped}, {})
    assert len(problems) == 1 and problems[0].startswith("gemm: signatures differ")

    missing = _fake("missing", gemm=gemm)
    problems = interface_differences({"spec": spec, "missing": missing}, {})
    assert problems == [
        "softmax: defined in ['spec'] but expected in ['missing', 'spec'] (every kernel is in all backends)"
    ]

    # a numba dispatcher is compared through its Python function
    jitted = types.ModuleType("jitted")
    gemm_jit.__module__ = "kernels.fake"
    jitted.gemm = njit(gemm_jit)
    jitted.softmax = softmax
    problems = interface_differences({"spec": spec, "jitted": jitted}, {})
    assert len(problems) == 1 and "trans_b=True" in problems[0]


@pytest.mark.parametrize("label", sorted(BACKENDS))
def test_backend_only_helpers_are_where_declared(label):
    funcs = public_functions(BACKENDS[label])
    for name, where in BACKEND_ONLY.items():
        assert (name in funcs) == (label in where), (name, label)
