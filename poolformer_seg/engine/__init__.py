"""Crash safety and exact resume for MMEngine training runs.

See ``docs/reliability.md``. Importing this package registers the
``'local_atomic'`` file backend and the hooks in mmseg's ``HOOKS``.
"""
from .atomic import (AtomicLocalBackend, DiskFullError, atomic_write,
                     find_resumable_checkpoint, is_complete_checkpoint)
from .hooks import (FiniteLossHook, NonFiniteError, RNGStateHook,
                    SafeCheckpointHook, capture_rng_state, restore_rng_state)
from .config_check import ConfigError, check_config, read_config
from .launch import (add_debug_argument, adapt_to_cpu_distributed,
                     init_cpu_process_group, load_tool_config,
                     quiet_known_warnings, run_tool)
from .optim_wrapper import AmpOnCudaOptimWrapper

__all__ = ['AtomicLocalBackend', 'DiskFullError', 'atomic_write',
           'find_resumable_checkpoint',
           'is_complete_checkpoint', 'FiniteLossHook', 'NonFiniteError',
           'RNGStateHook', 'SafeCheckpointHook', 'capture_rng_state',
           'restore_rng_state', 'adapt_to_cpu_distributed',
           'init_cpu_process_group', 'load_tool_config',
           'quiet_known_warnings',
           'AmpOnCudaOptimWrapper', 'ConfigError', 'check_config',
           'read_config', 'add_debug_argument', 'run_tool']
