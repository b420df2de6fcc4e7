"""Multi-process training on torch.distributed (launched with torchrun).

env: process-group setup and small collectives; parallel: what `widenet train`
does on several processes (data parallel, FSDP, expert parallel);
expert_parallel: the MoE whose experts are split across ranks.
"""

from .env import (DistEnv, all_reduce_mean, all_reduce_sum, barrier, destroy_distributed, distributed_session,
                  exit_without_finalizing, init_distributed, main_process_first)
from .expert_parallel import (ExpertParallelMoE, consolidated_state_dict, convert_to_expert_parallel,
                              load_consolidated_state_dict)

__all__ = ["DistEnv", "ExpertParallelMoE", "all_reduce_mean", "all_reduce_sum", "barrier",
           "consolidated_state_dict", "convert_to_expert_parallel", "destroy_distributed",
           "distributed_session", "exit_without_finalizing", "init_distributed", "load_consolidated_state_dict",
           "main_process_first"]
