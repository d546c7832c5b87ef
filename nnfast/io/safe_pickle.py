"""Reading nnU-Net's pickles without running code: an unpickler that builds only data.

nnU-Net keeps some of its files as pickles (the preprocessed cases' properties ``<case>.pkl``, the properties next to
``--save_probabilities`` output, ``postprocessing.pkl``). ``pickle.load`` would import and call whatever such a file
names, so nnfast reads them with :func:`load_data_pickle`: a pickle may refer only to the allowlisted globals below
(numpy arrays, dtypes and scalars, a few builtin containers); any other reference is refused by name before it is
imported. Callers may allow further names mapped to stand-ins (``postprocessing.pkl`` refers to nnU-Net's
postprocessing function, which is mapped to its name and never imported). nnfast itself never writes pickles.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import NnfastError

__all__ = ["DATA_GLOBALS", "load_data_pickle"]

#: What nnU-Net's data pickles may refer to (numpy 1.x and 2.x module names): arrays, dtypes, scalars.
DATA_GLOBALS: frozenset = frozenset({
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    *(("builtins", n) for n in ("set", "frozenset", "complex", "bytearray")),
    ("_codecs", "encode"),  # how protocols 0-2 write the bytes of an array: str -> bytes, nothing else
})


def load_data_pickle(path: Path | str, *, refuse: Callable[[str], Exception],
                     unreadable: Callable[[str], Exception], stand_ins: Mapping[tuple[str, str], Any] | None = None):
    """``pickle.load`` of ``path`` that builds only data.

    Parameters
    ----------
    path : path
        The pickle.
    refuse : callable
        ``refuse(dotted name)`` -> the exception (an :class:`~nnfast.errors.NnfastError`) raised when the file refers to a global outside the allowlist.
    unreadable : callable
        ``unreadable(reason)`` -> the exception raised when the file is truncated or not a pickle.
    stand_ins : mapping, optional
        ``{(module, name): object}``: further globals the file may refer to, each replaced by ``object`` (which is
        returned in its place, never imported).

    Returns
    -------
    object
        What the pickle holds.
    """
    import _compat_pickle
    import pickle

    extra = dict(stand_ins or {})

    class _DataOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # Python 2 names (protocols 0-2), mapped as the base class maps them; Python 3 names pass unchanged
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            if (module, name) in extra:
                return extra[(module, name)]
            if (module, name) not in DATA_GLOBALS:
                raise refuse(f"{module}.{name}")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            return _DataOnly(f).load()
    except NnfastError:  # refused by name
        raise
    except Exception as e:  # truncated, or not a pickle
        raise unreadable(f"{type(e).__name__}: {e}") from e
