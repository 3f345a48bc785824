"""`mm15`: the command line.

  mm15 demo [--workdir DIR]                        synthetic corpus -> 3 stages -> evaluation, on CPU
            [--variant video|ui]                   then MM1.5-Video / MM1.5-UI from its SFT checkpoint
  mm15 data synth --out DIR [--seed N]             the synthetic corpus (TFDS ArrayRecord) and its tokenizer
                  [--video] [--ui [--ui-size S]]   (+ video QA datasets; + mobile-UI screens and tasks)
  mm15 train --config NAME|FILE.py --workdir DIR   every stage of an experiment (or --stage NAME)
  mm15 ablate --config NAME --grid KEY=V1,V2 --workdir DIR
                                                   the last stage (or --stage) per grid point, evaluated: a table
                                                   and a plot of category scores per point
  mm15 eval --workdir DIR | --checkpoint DIR       benchmark evaluation of a checkpoint on the "test" splits
            [--benchmarks a,b] [--n-max 16]        of the data dir: report.json, categories.png, a table
  mm15 eval import --format F --input FILE --out DATA_DIR --name NAME
                                                   a public benchmark (textvqa, docvqa, chartqa, refcoco, jsonl,
                                                   mme, pope, multi_mc, videomme, video_mc; --shots K
                                                   --support F: few-shot)
                                                   -> records dataset NAME, split "test"
  mm15 generate --checkpoint DIR --image F --prompt TEXT [--draw out.png]
                                                   answer about images, streamed; boxes/points drawn
  mm15 data convert --format webdataset|parquet|jsonl|llava|llava-video|rico --kind K --input F...
                    --out DATA_DIR --name NAME
                                                   datasets as shipped -> TFDS ArrayRecord (parallel, restartable)
  mm15 convert-hf --vision DIR --decoder DIR --out CKPT
                                                   HF / open_clip ViT + HF LLM safetensors -> a stage-1 checkpoint
  mm15 export-hf --checkpoint DIR --tokenizer F --out DIR
                                                   transformers model + processor (remote code) + the decoder as
                                                   a standard LLM
  mm15 aot --config NAME --topology v5p:4x4x4    compile the train step for a TPU slice: per-chip memory, FLOPs
                                                   collective bytes, a roofline estimate; --hlo FILE: the HLO
  mm15 params --model NAME                         parameter counts, without allocating weights
  mm15 config --config NAME                        the resolved experiment as JSON

Errors print one line and exit 2 (bad input) or 1 (a run that failed); `mm15 --debug ...` or MM15_DEBUG=1 shows
the traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import traceback

from mm15_jax import errors


def _key_values(pairs: list[str], flag: str) -> dict:
  out = {}
  for pair in pairs or []:
    if "=" not in pair:
      raise SystemExit(f"{flag} {pair!r}: expected key=value")
    k, v = pair.split("=", 1)
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def load_experiment(name: str, args: list[str] | None = None, overrides: list[str] | None = None):
  """A built-in config name (`tiny`, `mm15`) or a path to a Python file with `get_config(**args)`."""
  from mm15_jax import config as config_lib
  if name.endswith(".py"):
    if not os.path.exists(name):
      raise SystemExit(f"--config {name}: no such file")
    spec = importlib.util.spec_from_file_location("mm15_user_config", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    from mm15_jax.configs import mm15, mm15_ui, mm15_video, tiny, tiny_ui, tiny_video
    builtin = {"tiny": tiny, "mm15": mm15, "tiny_video": tiny_video, "mm15_video": mm15_video, "tiny_ui": tiny_ui,
               "mm15_ui": mm15_ui}
    if name not in builtin:
      raise SystemExit(f"--config {name!r}: not a built-in config ({sorted(builtin)}) nor a .py file")
    module = builtin[name]
  kwargs = _key_values(args, "--arg")
  accepted = inspect.signature(module.get_config).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
      raise errors.UserError(f"--arg {unknown[0]}: get_config() of --config {name} takes {sorted(accepted)}")
  try:
    exp = module.get_config(**kwargs)
  except ValueError as e:  # the config's own check of its arguments, or a removed key
    raise errors.UserError(f"--config {name}: {e.args[0] if e.args else e}") from e
  try:
    exp = config_lib.override(exp, overrides or [])
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise errors.UserError(f"--set: {e.args[0] if e.args else e}") from e
  config_lib.validate(exp)
  return exp


def _add_config_flags(p):
  p.add_argument("--config", default="tiny", help="built-in config name or a .py file with get_config()")
  p.add_argument("--arg", action="append", default=[], help="key=value passed to get_config()")
  p.add_argument("--set", action="append", default=[], help="dotted override, e.g. stages.sft.steps=10")


def _add_eval_flags(p):
  """What an evaluation reads and how it generates (mm15 eval, mm15 ablate)."""
  p.add_argument("--data-dir", default="", help="where the benchmarks are (default: the stage's data_dir)")
  p.add_argument("--benchmarks", default="", help="comma-separated names (default: every 'test' split)")
  p.add_argument("--n-max", type=int, default=0, help="inference dynamic split n_max, up to 16 (0: the stage's)")
  p.add_argument("--max-examples", type=int, default=0, help="per benchmark; 0 = all")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-new-tokens", type=int, default=24)


def cmd_train(a):
  from mm15_jax import config as config_lib
  from mm15_jax.eval import run as eval_run
  from mm15_jax.train import distributed, runner
  distributed.initialize()
  exp = load_experiment(a.config, a.arg, a.set)
  names = [s.name for s in exp.stages]
  wanted = a.stage.split(",") if a.stage else names
  unknown = sorted(set(wanted) - set(names))
  if unknown:
    raise SystemExit(f"--stage: unknown stage(s) {unknown}; this config has {names}")
  from mm15_jax.train import lock
  for i, stage in enumerate(exp.stages):
    if stage.name in wanted:  # everything a stage reads is checked before the first compile
      config_lib.validate_inputs(exp, i, a.workdir)
  with lock.WorkdirLock(a.workdir):
    for i, stage in enumerate(exp.stages):
      if stage.name in wanted:
        runner.run_stage(exp, i, a.workdir, evaluate=eval_run.periodic_eval)


def cmd_aot(a):
  if a.topology not in ("", "cpu", "local"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology without claiming attached chips
  from mm15_jax.train import aot
  exp = load_experiment(a.config, a.arg, a.set)
  try:
    aot.command(exp, a.stage.split(",") if a.stage else [], a.topology, a.num_slices, a.json,
                overrides=tuple(a.set or ()), fit=a.fit, hlo_path=a.hlo)
  except (RuntimeError, ValueError) as e:
    raise SystemExit(f"mm15 aot: {e}") from e


def cmd_ablate(a):
  from mm15_jax import ablate
  from mm15_jax.train import distributed
  distributed.initialize()
  ablate.command(a, load_experiment)


def cmd_eval(a):
  from mm15_jax.eval import run as eval_run
  if not (a.workdir or a.checkpoint):
    raise SystemExit("mm15 eval: give --workdir (the stage's final checkpoint) or --checkpoint")
  if a.checkpoint and not (a.out or a.workdir):
    raise SystemExit("mm15 eval: --checkpoint without --workdir needs --out (where the report goes)")
  if a.out and not a.checkpoint:
    raise SystemExit("mm15 eval: --out goes with --checkpoint; --workdir alone writes WORKDIR/eval")
  exp = load_experiment(a.config, a.arg, a.set)
  stage = a.stage or -1
  options = dict(stage=stage, data_dir=a.data_dir, benchmarks=a.benchmarks, n_max=a.n_max or None,
                 max_examples=a.max_examples, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
  if a.checkpoint:
    result = eval_run.evaluate_checkpoint(exp, a.checkpoint, out_dir=a.out or os.path.join(a.workdir, "eval"),
                                          **options)
  else:
    result = eval_run.evaluate_workdir(exp, a.workdir, **options)
  print(eval_run.format_table(result))


def cmd_generate(a):
  from mm15_jax.eval import ask
  exp = load_experiment(a.config, a.arg, a.set)
  try:
    ask.ask(exp, a.checkpoint, a.image, a.prompt, stage=a.stage or -1, n_max=a.n_max or None,
            max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, draw=a.draw)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"mm15 generate: {e}") from e


def cmd_eval_import(a):
  from mm15_jax.eval import adapters
  options = {"instruction": a.instruction, "shots": a.shots, "support": a.support, "seed": a.seed}
  if a.format == "refcoco":
    options.update(instances=a.instances, split=a.split)
  if a.format == "jsonl":
    if not (a.metric and a.category):
      raise SystemExit("mm15 eval import --format jsonl needs --metric and --category")
    options.update(metric=a.metric, category=a.category)
  if a.format in ("multi_mc", "video_mc") and a.category:
    options.update(category=a.category)
  if a.format in ("videomme", "video_mc"):
    options.update(frames=a.video_frames)
  try:
    n = adapters.import_benchmark(a.format, a.input, out_dir=a.out, name=a.name, images_dir=a.images,
                                  max_examples=a.max_examples, overwrite=a.overwrite, **options)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"mm15 eval import: {e}") from e
  print(f"[eval import] {a.name}: {n} examples ({a.format}) -> {os.path.join(a.out, a.name)} split 'test'")


def cmd_demo(a):
  from mm15_jax import demo
  demo.run(a.workdir, variant=a.variant, scale=a.scale, seed=a.seed, overrides=a.set)


def cmd_synth(a):
  from mm15_jax.data import synth
  synth.synth_command(a)


def cmd_convert(a):
  from mm15_jax.data import convert
  convert.convert_command(a)


def cmd_convert_hf(a):
  from mm15_jax.convert import convert_hf
  from mm15_jax.train import distributed
  distributed.initialize()
  try:
    convert_hf.command(a)
  except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
    raise SystemExit(f"mm15 convert-hf: {e.args[0] if e.args else e}") from e


def cmd_export_hf(a):
  from mm15_jax.convert import export_hf
  try:
    export_hf.command(a)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"mm15 export-hf: {e}") from e


def cmd_params(a):
  from mm15_jax.models import count
  count.print_counts(a.model)


def cmd_config(a):
  from mm15_jax import config as config_lib
  print(config_lib.to_json(load_experiment(a.config, a.arg, a.set)))


def main(argv: list[str] | None = None):
  """Parses `argv` and runs the command; errors propagate (`entry` is the command line's wrapper)."""
  parser = argparse.ArgumentParser(prog="mm15", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("demo", help="synthetic data, three stages and evaluation on CPU")
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--variant", choices=("image", "video", "ui"), default="image",
                 help="video / ui: continue the image demo's checkpoint as MM1.5-Video / MM1.5-UI")
  p.add_argument("--scale", type=float, default=1.0, help="multiplies corpus size and step counts")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", action="append", default=[], help="dotted override, e.g. stages.sft.steps=100")
  p.set_defaults(fn=cmd_demo)

  data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
  p = data.add_parser("synth", help="build the synthetic corpus")
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--video", action="store_true",
                 help="add the synthetic video QA datasets (the image corpus is built first if DIR has none)")
  p.add_argument("--ui", action="store_true", help="also the mobile-UI datasets (ui_*) for MM1.5-UI")
  p.add_argument("--ui-size", default="small", choices=["small", "phone"],
                 help="UI screens at 180x320 (tiny models) or a phone's 1080x1920")
  p.set_defaults(fn=cmd_synth)
  p = data.add_parser("convert", help="convert webdataset tars, parquet, JSONL, LLaVA or RICO JSON into a dataset")
  p.add_argument("--format", required=True, choices=["webdataset", "parquet", "jsonl", "llava", "llava-video", "rico"])
  p.add_argument("--input", required=True, nargs="+", help="files, globs or folders")
  p.add_argument("--out", required=True, help="data dir that receives the dataset")
  p.add_argument("--name", required=True, help="dataset name, e.g. ocr_pdfa")
  p.add_argument("--split", default="train", choices=["train", "test"])
  p.add_argument("--kind", default="", help="webdataset: ocr|caption; parquet: ocr|caption|text|interleaved|sft; "
                                             "jsonl: text|interleaved; llava, llava-video make sft; "
                                             "rico: sft|ui_ocr|ui_widget|ui_icon|ui_ground")
  p.add_argument("--source", default="", help="the records' source field (default: --name)")
  p.add_argument("--category", default="", help="SFT category (llava, --kind sft; llava-video: "
                                                 "default video)")
  p.add_argument("--text-field", default="", help="webdataset: dotted key in the .json member (default: .txt)")
  p.add_argument("--image-column", default="", help="default: image (interleaved: images)")
  p.add_argument("--text-column", default="", help="default: text (interleaved: texts)")
  p.add_argument("--image-root", default="", help="folder image paths are relative to (llava, llava-video "
                                                  "videos: required; "
                                                  "parquet/jsonl: default the input file's folder)")
  p.add_argument("--records-per-shard", type=int, default=10000,
                 help="llava: entries (rico: screens) per parallel shard")
  p.add_argument("--video-frames", type=int, default=0,
                 help="llava-video: store this many uniformly sampled frames (JPEG) instead of the video file")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--max-bad-fraction", type=float, default=0.01)
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("train", help="train the stages of an experiment")
  _add_config_flags(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", default="", help="comma-separated stage names (default: all, in order)")
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("ablate", help="one short run per grid point of config overrides, evaluated: table and plot")
  _add_config_flags(p)
  p.add_argument("--grid", action="append", default=[], required=True,
                 help="dotted key=v1,v2,... (as --set); several --grid: their product")
  p.add_argument("--workdir", required=True, help="shared stages, one folder per point, ablation.md/.json/.png")
  p.add_argument("--stage", default="", help="consecutive stages each point trains (default: the last)")
  _add_eval_flags(p)
  p.set_defaults(fn=cmd_ablate)

  p = sub.add_parser("aot", help="compile the train step for a TPU topology here; per-chip memory and FLOPs")
  _add_config_flags(p)
  p.add_argument("--topology", default="cpu", help="TPU topology, e.g. v5p:4x4x4, v5e:4x4; cpu: local devices")
  p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (sets mesh.dcn_data)")
  p.add_argument("--stage", default="", help="comma-separated stage names (default: all)")
  p.add_argument("--json", default="", help="append each report to this file as a JSON line")
  p.add_argument("--fit", default="", choices=["", "grad_accum", "remat"],
                 help="per stage, compile this knob's settings in order until one fits the chip's HBM")
  p.add_argument("--hlo", default="", help="write the compiled HLO text here (FILE.<stage> for several stages)")
  p.set_defaults(fn=cmd_aot)

  p = sub.add_parser("eval", help="evaluate a checkpoint on benchmarks; `mm15 eval import` converts benchmarks")
  _add_config_flags(p)
  p.add_argument("--workdir", default="", help="evaluate the final checkpoint of a stage (--stage, default last)")
  p.add_argument("--checkpoint", default="", help="a checkpoint directory (its latest step) instead")
  p.add_argument("--stage", default="", help="stage whose data settings (tokenizer, tiles) apply; default last")
  _add_eval_flags(p)
  p.add_argument("--out", default="", help="report folder (with --checkpoint; --workdir writes WORKDIR/eval)")
  p.set_defaults(fn=cmd_eval)
  q = p.add_subparsers(dest="eval_command").add_parser(
      "import", help="public benchmark files -> records dataset (split 'test') for `mm15 eval`")
  q.add_argument("--format", required=True,
                 choices=["textvqa", "docvqa", "chartqa", "refcoco", "jsonl", "mme", "pope", "multi_mc", "videomme",
                          "video_mc"])
  q.add_argument("--input", action="append", required=True, help="annotation file; repeat to concatenate")
  q.add_argument("--images", default="", help="image root (default: the annotation file's folder)")
  q.add_argument("--out", required=True, help="data dir to write into")
  q.add_argument("--name", required=True, help="dataset (benchmark) name, e.g. TextVQA")
  q.add_argument("--split", default="val", help="refcoco: refs split (val, testA, testB, test)")
  q.add_argument("--instances", default="", help="refcoco: instances.json (default: beside the refs file)")
  q.add_argument("--metric", default="", help="jsonl: metric (exact, vqa, anls, relaxed, iou, mc, mme, pope)")
  q.add_argument("--category", default="", help="jsonl, multi_mc, video_mc: the paper's category, e.g. Knowledge")
  q.add_argument("--video-frames", type=int, default=0,
                 help="videomme, video_mc: store this many uniformly sampled frames (JPEG) instead of the video file")
  q.add_argument("--instruction", default=None,
                 help="text appended to every question (default: the format's, e.g. 'Answer the question using a "
                      "single word or phrase.'; '' for none)")
  q.add_argument("--shots", type=int, default=0, help="few-shot: support examples before each query (VL-ICL)")
  q.add_argument("--support", action="append", default=[], help="with --shots: support file(s) of the same format")
  q.add_argument("--seed", type=int, default=0, help="with --shots: the draw of support examples")
  q.add_argument("--max-examples", type=int, default=0, help="0 = all")
  q.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
  q.set_defaults(fn=cmd_eval_import)

  p = sub.add_parser("generate", help="answer a prompt about images with a checkpoint, streamed to the terminal")
  _add_config_flags(p)
  p.add_argument("--checkpoint", required=True, help="checkpoint directory (its latest step)")
  p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
  p.add_argument("--prompt", required=True, help='the question; "<image>" marks place the images (default: first)')
  p.add_argument("--stage", default="", help="stage whose data settings (tokenizer, tiles) apply; default last")
  p.add_argument("--n-max", type=int, default=0, help="dynamic split's largest grid, up to 16 (0: the stage's)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--draw", default="", help="write the first image with the answer's boxes and points here (PNG)")
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("convert-hf", help="Hugging Face CLIP + LLM safetensors -> a checkpoint for init_from")
  p.add_argument("--vision", default="", help="HF CLIPVisionModel / CLIPModel or open_clip directory")
  p.add_argument("--decoder", default="", help="HF Llama / Qwen2 / Mixtral / Qwen2-MoE directory (safetensors)")
  p.add_argument("--model", default="", help="preset whose vision tower or decoder is used (random) when the "
                 "other part alone is imported")
  p.add_argument("--out", required=True, help="checkpoint directory to create")
  p.add_argument("--connector-hidden", type=int, default=1024)
  p.add_argument("--connector-depth", type=int, default=3)
  p.add_argument("--pooled-side", type=int, default=12, help="connector output grid side (12: 144 tokens)")
  p.add_argument("--feature-layer", type=int, default=-1, help="ViT hidden state fed to the connector")
  p.add_argument("--vocab-size", type=int, default=0, help="embedding rows (default: HF vocab rounded up to 128)")
  p.add_argument("--tokenizer", default="",
                 help="the LLM's tokenizer (.model, tokenizer.json or its directory): sets the embedding rows")
  p.add_argument("--upcycle", action="store_true", help="dense decoder -> MoE, experts copied from the dense FFN")
  p.add_argument("--moe-experts", type=int, default=0, help="experts per MoE layer with --upcycle (default 64)")
  p.add_argument("--moe-top-k", type=int, default=2)
  p.add_argument("--moe-every", type=int, default=2, help="an MoE FFN in every n-th layer")
  p.add_argument("--fsdp", type=int, default=-1, help="mesh axes of the conversion (-1: the remaining devices)")
  p.add_argument("--tensor", type=int, default=1)
  p.add_argument("--expert", type=int, default=1)
  p.add_argument("--seed", type=int, default=0, help="initialisation of the connector (and routers)")
  p.set_defaults(fn=cmd_convert_hf)

  p = sub.add_parser("export-hf", help="a checkpoint -> transformers (remote code) + its decoder as a standard LLM")
  p.add_argument("--checkpoint", required=True, help="checkpoint directory (its latest step)")
  p.add_argument("--tokenizer", required=True,
                 help="the tokenizer the model was trained with (its ids; copied to OUT/tokenizer for the processor)")
  p.add_argument("--out", required=True, help="directory to write (the decoder alone goes to OUT/decoder)")
  p.set_defaults(fn=cmd_export_hf)

  p = sub.add_parser("params", help="parameter counts per part (no weights allocated)")
  p.add_argument("--model", default="tiny")
  p.set_defaults(fn=cmd_params)

  p = sub.add_parser("config", help="print the resolved experiment config")
  _add_config_flags(p)
  p.set_defaults(fn=cmd_config)

  a = parser.parse_args(argv)
  a.fn(a)


def entry(argv: list[str] | None = None):
  """The `mm15` command: `main` with every error as one line on stderr, exit 2 (bad input) or 1 (failed run)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--debug" in argv:
    argv.remove("--debug")
    os.environ["MM15_DEBUG"] = "1"
  if not errors.debug():
    errors.quiet_library_reports()
  try:
    main(argv)
  except SystemExit as e:
    if isinstance(e.code, str) and not errors.debug():  # a message: bad input
      _fail(e.code, 2)
    raise
  except KeyboardInterrupt:
    _fail("interrupted", 130)
  except Exception as e:  # pylint: disable=broad-except
    if errors.debug():
      traceback.print_exc()
    code = getattr(e, "exit_code", 2 if isinstance(e, errors.INPUT_ERRORS) else 1)
    unexpected = code == 1 and not isinstance(e, errors.RunError) and not errors.debug()
    hint = " (mm15 --debug ... shows the traceback)" if unexpected else ""
    _fail(errors.one_line(e) + hint, code)


def _fail(line: str, code: int):
  sys.stderr.flush()
  print(line if line.startswith("mm15") else f"mm15: {line}", file=sys.stderr, flush=True)
  raise SystemExit(code)


if __name__ == "__main__":
  entry()
