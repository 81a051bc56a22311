"""Analysis tools that need attention probabilities (ARCHITECTURE §2): MoA's attention-influence profile and span
plan selection (`influence`), ACT's attention calibration and head search (`calibration`), attention rollout, head
divergence, head-ablation tables and retrieval-head scores (`maps`). Pure JAX / NumPy, used offline on materialised
maps."""

from attnx.analysis.calibration import (act_calibrate, act_flash_epilogue, act_head_search, act_sink_columns,
                                        act_sink_set)
from attnx.analysis.influence import (aggregate_blocks, attention_influence, select_span_plan, span_config_grid,
                                      span_density, span_plan_loss)
from attnx.analysis.maps import (ablation_deltas, attention_rollout, head_divergence, rank_heads, retrieval_heads,
                                 retrieval_score_step, retrieval_scores, rollout_to_grid)

__all__ = ["act_calibrate", "act_flash_epilogue", "act_head_search", "act_sink_columns", "act_sink_set",
           "aggregate_blocks", "attention_influence", "select_span_plan", "span_config_grid", "span_density",
           "span_plan_loss", "ablation_deltas", "attention_rollout", "head_divergence", "rank_heads",
           "retrieval_heads", "retrieval_score_step", "retrieval_scores", "rollout_to_grid"]
