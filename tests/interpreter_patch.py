"""The Triton interpreter without its repeated language patch (a test-time speed-up only).

Under ``TRITON_INTERPRET=1`` a kernel launch patches ``triton.language`` to the interpreter's
semantics (``interpreter._patch_lang``) and restores it when the launch ends. Every call of a
``@triton.jit`` helper inside the kernel (``_key_block``, ``tl.zeros``, ``tl.max``, ...) runs
``_patch_lang`` again: it walks every member of ``tl``, ``tl.core``, ``tl.tensor`` and
``tl.math`` with ``inspect.getmembers`` and re-sets the attributes it patched, which are
already patched; it is never restored (its scope is dropped). That repetition was about a
fifth of the interpreter's time in tests/test_attention.py.

:func:`install` keeps one thing from it: inside a launch, a helper whose language modules the
launch (or an earlier helper of it) already patched gets no second patch; a helper that sees a
module not yet patched (``tl.core`` from ``triton.language.standard``) is patched as before,
and its modules are counted as patched for the rest of the launch. The patched state each
helper runs under is the same as without it, so every kernel computes the same values.
Where the interpreter's internals are not as expected, nothing is changed.
"""

from __future__ import annotations

import inspect


def install() -> bool:
    """Wrap ``triton.runtime.interpreter._patch_lang``; ``False`` where it cannot be."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no triton here: nothing to speed up
        return False
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "reuses_the_launch_patch", False) or \
            not hasattr(interpreter, "_LangPatchScope") or not hasattr(interpreter._LangPatchScope, "restore"):
        return False
    patched: list = [None]  # the language modules patched in the current launch (None: no launch)

    def languages(fn) -> frozenset:
        # the modules _patch_lang patches for fn
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    def patch_lang(fn):
        langs = languages(fn)
        if patched[0] is not None and langs <= patched[0]:
            return interpreter._LangPatchScope()  # already patched in this launch: nothing to restore
        scope = original(fn)
        if patched[0] is not None:  # a helper's patch (never restored, as without this wrapper)
            patched[0] = patched[0] | langs
            return scope
        patched[0] = langs  # a launch: patched until it restores its scope
        restore = scope.restore

        def restore_and_end_the_launch():
            patched[0] = None
            restore()

        scope.restore = restore_and_end_the_launch
        return scope

    patch_lang.reuses_the_launch_patch = True
    interpreter._patch_lang = patch_lang
    return True
