"""The speechtokenizer package as the codec modules use it: its model imported without its broken
``__init__``, and the upstream classes they walk. The one place that knows about the packaging problem."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

INSTALL_HINT = "pip install --no-deps speechtokenizer==1.0.1"


def import_speechtokenizer_model() -> ModuleType:
    """``speechtokenizer.model`` without running the package ``__init__``.

    speechtokenizer 1.0.1's ``__init__`` imports its trainer, which needs beartype and a torchaudio
    that does not load beside current torch. The model needs neither, so we register an empty package
    module (its ``__path__`` from the installed package, its ``__init__`` never executed) and import
    the model module from it. This is the only place that knows about the problem.
    """
    if "speechtokenizer" not in sys.modules:
        spec = importlib.util.find_spec("speechtokenizer")  # finding a spec runs no package code
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"the SpeechTokenizer codec needs the speechtokenizer package: {INSTALL_HINT} "
                              f"(--no-deps: its declared requirements are its trainer's)")
        sys.modules["speechtokenizer"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("speechtokenizer.model")


def upstream() -> dict[str, Any]:
    """The upstream classes and helpers the codec modules walk; the layout test pins them."""
    model = import_speechtokenizer_model()
    conv = importlib.import_module("speechtokenizer.modules.conv")
    seanet = importlib.import_module("speechtokenizer.modules.seanet")
    lstm = importlib.import_module("speechtokenizer.modules.lstm")
    return {
        "SpeechTokenizer": model.SpeechTokenizer,
        "SConv1d": conv.SConv1d,
        "SConvTranspose1d": conv.SConvTranspose1d,
        "pad1d": conv.pad1d,
        "extra_padding": conv.get_extra_padding_for_conv1d,
        "SEANetResnetBlock": seanet.SEANetResnetBlock,
        "Snake1d": seanet.Snake1d,
        "SLSTM": lstm.SLSTM,
    }
