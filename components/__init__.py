"""Thin KFP components, one per nacd stage: each imports the library and makes one call.

Every component runs in the project image (:data:`IMAGE`) where nacd is installed, so
``install_kfp_package=False``: the image already has the pinned kfp. Config arrives as the
sections the stage reads (see ``nacd.pipeline_params.STAGE_SECTIONS``), never credentials.
"""
from components.stages import (IMAGE, eval_plan, evaluate, expert_indices, full_variant,
                               prepare_data, project_ids, report, select_less, select_random,
                               select_seeds, distill, train_experts)

__all__ = ["IMAGE", "distill", "eval_plan", "evaluate", "expert_indices", "full_variant",
           "prepare_data", "project_ids", "report", "select_less", "select_random", "select_seeds",
           "train_experts"]
