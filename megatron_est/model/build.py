"""Build this rank's part of the model: its pipeline stage's layers, tensor-parallel shards of each."""
from __future__ import annotations

from megatron_est.config import Config
from megatron_est.parallel.partition import stage_ranges
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState


def build_model(cfg: Config, st: ParallelState) -> LanguageModel:
    """The stage of pipeline rank st.pp_rank (the whole model when pp == 1), on st.device.

    Weights are drawn per parameter from its global name, so any layout starts from the same model.
    """
    first, last = stage_ranges(cfg)[st.pp_rank]
    model = LanguageModel(cfg.model, st, seed=cfg.train.seed, layer_range=(first, last),
                          pre_process=st.is_first_stage, post_process=st.is_last_stage)
    return model.to(st.device)
