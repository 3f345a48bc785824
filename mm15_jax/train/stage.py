"""A stage made ready to train or compile: its model config, optimiser, train state and the jitted step.

The runner, the AOT compile and the benchmarks build a stage the same way, so what they run or measure is the
step `mm15 train` runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from mm15_jax.config import Experiment, ModelConfig, StageConfig
from mm15_jax.data import batch as batch_lib
from mm15_jax.data import pipeline as pipeline_lib
from mm15_jax.train import optim
from mm15_jax.train import state as state_lib
from mm15_jax.train.step import TrainState, make_train_step


def stage_model_config(model: ModelConfig, stage: StageConfig, vocab_size: int) -> ModelConfig:
  """The model as this stage sees it: encoder position embeddings at the stage's tile size, vocab of the tokenizer."""
  if model.decoder.vocab_size and model.decoder.vocab_size < vocab_size:
    raise ValueError(f"config key model.decoder.vocab_size={model.decoder.vocab_size} is smaller than the "
                     f"tokenizer's {vocab_size} (0 takes the tokenizer's)")
  return dataclasses.replace(
      model, vision=dataclasses.replace(model.vision, image_size=stage.image_size),
      decoder=dataclasses.replace(model.decoder, vocab_size=model.decoder.vocab_size or vocab_size))


@dataclasses.dataclass
class Stage:
  """What training stage `config` needs on `mesh`."""
  config: StageConfig
  model_cfg: ModelConfig
  mesh: Any
  graphdef: Any
  rest: Any                         # the model's non-Param state
  tx: optax.GradientTransformation
  state: TrainState                 # initialised, or abstract (sharded ShapeDtypeStructs) with init="abstract"
  shardings: TrainState             # of the state
  step: Callable                    # jitted (state, Batch) -> (state, metrics); donates the state

  def batch_spec(self) -> batch_lib.Batch:
    return batch_lib.batch_spec(self.config, self.mesh)


def build_stage(exp: Experiment, index: int, mesh, *, vocab_size: int, image_token_id: int,
                init: str | Callable = "abstract", num_sources: int | None = None,
                compiler_options: dict | None = None) -> Stage:
  """Stage `index` of `exp` on `mesh`. `init`: "abstract" (nothing allocated: an AOT compile, the target of a
  restore), "random" (exp.seed), or model_cfg -> (graphdef, params, rest) with the parameters in their shards.
  `num_sources`: of the per-source loss (default: the stage's mixture)."""
  stage = exp.stages[index]
  model_cfg = stage_model_config(exp.model, stage, vocab_size)
  if init == "abstract":
    graphdef, params, rest = state_lib.sharded_abstract_model(model_cfg, mesh, exp.seed)
  elif init == "random":
    graphdef, params, rest = state_lib.init_params(model_cfg, mesh, exp.seed)
  else:
    graphdef, params, rest = init(model_cfg)
  tx = optim.make_optimizer(stage, params)
  if init == "abstract":
    state = state_lib.abstract_train_state(params, tx, mesh)
  else:
    state = state_lib.new_train_state(params, tx, mesh)
  if num_sources is None:
    num_sources = len(pipeline_lib.source_names(stage.data))
  step_fn = make_train_step(graphdef, rest, tx, model_cfg=model_cfg, image_token_id=image_token_id,
                            num_sources=num_sources, grad_accum=stage.grad_accum)
  shardings = state_lib.state_shardings(state)
  step = jax.jit(step_fn, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0,
                 compiler_options=compiler_options)
  return Stage(config=stage, model_cfg=model_cfg, mesh=mesh, graphdef=graphdef, rest=rest, tx=tx, state=state,
               shardings=shardings, step=step)
