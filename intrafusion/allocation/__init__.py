"""Budgets and allocations: which sparsity each group gets so that the pruned network keeps a
given fraction of the unpruned MACs, parameters or channels.

- budget.py: budgets, the cost model of a plan, and the calibration of a plan to a real budget;
- profile.py: the sensitivity profile on held-out training images, and its cache;
- solve.py: the uniform, global and sensitivity solves, and `allocate`, which runs one of them.
"""
from .budget import (BUDGETS, TOLERANCE, CostModel, calibrate, check_budget, group_widths, kept_of,
                     layer_costs, measure_cost_model, one_budget, plan_from_widths, plan_of,
                     prune_widths, snap, sparsity_of)
from .profile import (LADDER, HeldOutLoss, Profile, cached_profile, measure_profile, measure_rungs,
                      profile_key, profile_rungs, read_partial, read_profile, tensor_digest, write_profile)
from .solve import (ALLOCATIONS, Allocation, allocate, global_ranking, iterative_solve, loss_curve,
                    normalized_scores, refill, solve, uniform)

__all__ = ["BUDGETS", "TOLERANCE", "CostModel", "calibrate", "check_budget", "group_widths",
           "kept_of", "layer_costs", "measure_cost_model", "one_budget", "plan_from_widths",
           "plan_of", "prune_widths", "snap", "sparsity_of", "LADDER", "HeldOutLoss", "Profile",
           "cached_profile", "measure_profile", "measure_rungs", "profile_key", "profile_rungs",
           "read_partial", "read_profile", "tensor_digest",
           "write_profile", "ALLOCATIONS", "Allocation", "allocate", "global_ranking",
           "iterative_solve", "loss_curve", "normalized_scores", "refill", "solve", "uniform"]
