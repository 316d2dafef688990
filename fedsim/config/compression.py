"""The ``compression`` section: what clients upload, and what the server broadcasts, encoded
(:mod:`fedsim.pipeline.compression`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedsim.config.base import Frozen


class CompressionConfig(Frozen):
    """Compressed communication.

    ``upload``: how each client encodes its change of the shared tensors — ``fp16``, ``bf16`` (half precision),
    ``int8``, ``int4`` (blocks of ``block_size`` values, stochastic rounding: unbiased) or ``topk`` (the largest
    ``topk_fraction`` of each tensor's entries). ``download``: the server's broadcast of the adapter (``fp16``,
    ``bf16``, ``int8``, ``int4``). ``error_feedback``: the client keeps what it did not send and adds it to its next
    upload (default: on for ``topk``, off otherwise). ``none`` sends raw float32.
    """

    upload: Literal["none", "fp16", "bf16", "int8", "int4", "topk"] = "none"
    """how clients encode their uploads: none, fp16, bf16, int8, int4, topk"""
    download: Literal["none", "fp16", "bf16", "int8", "int4"] = "none"
    """how the server encodes its broadcast: none, fp16, bf16, int8, int4"""
    topk_fraction: float = Field(0.1, gt=0.0, le=1.0)
    """topk: the share of each tensor's entries sent"""
    block_size: int = Field(1024, ge=1, le=2**24)
    """int8 / int4: values per block (each block sends its float32 min and step)"""
    error_feedback: bool | None = None
    """clients keep what they did not send and add it next time (default: on for topk)"""

    @model_validator(mode="after")
    def _consistent(self) -> CompressionConfig:
        if self.error_feedback and self.upload == "none":
            raise ValueError("error_feedback keeps what a compressed upload left out, but upload is none: set "
                             "upload (e.g. topk), or drop error_feedback")
        if self.upload == "none" and self.download == "none":
            raise ValueError("nothing to compress: set upload (fp16, bf16, int8, int4, topk) and/or download (fp16, "
                             "bf16, int8, int4), or remove the compression section")
        return self

    @property
    def feedback(self) -> bool:
        """Whether clients carry what they did not send (``error_feedback``, defaulting to on for ``topk``)."""
        return self.upload == "topk" if self.error_feedback is None else self.error_feedback
