"""The `avatar` command: serve the mesh, generate a video through it, check or download weights."""

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from avatar import package_version
from avatar.app import arg_types, converse_cmd, livekit_worker, web_cmd

EXIT_BAD_INPUT = 2
# gRPC's core logs transport events at INFO unless told otherwise (e.g. "Got goaway ... Cancelling
# all calls" when an embedded mesh stops after a peer refused a request): errors only, so a
# refusal stays one line. Set before grpc is first imported; an explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


class UserError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from avatar.presets import DEFAULT_FP8_ATTENTION_KERNEL, FP8_ATTENTION_KERNELS

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=("tiny", "s2v-14b"),
        default=None,
        help="tiny: small random model, runs on CPU, renders noise (default without --ckpt_dir); "
        "s2v-14b: Wan2.2-S2V-14B + LiveAvatar LoRA (default with --ckpt_dir)",
    )
    g.add_argument("--ckpt_dir", help="folder holding the Wan2.2-S2V-14B checkpoint files")
    g.add_argument("--lora_path", help="LiveAvatar LoRA (liveavatar.safetensors)")
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="s2v-14b shapes with random values (benchmarks; the video is noise)",
    )
    g.add_argument("--device", default="cpu", help="torch device of the engines, e.g. cpu, cuda, cuda:1")
    g.add_argument(
        "--encoder-device",
        metavar="DEVICE",
        help="where the text and audio encoders (umT5, wav2vec2/Whisper, CLIP) run, e.g. cuda:4 or cpu "
        "(default: --device; the memory plan may choose cpu); docs/operations.md, 'GPU layouts'",
    )
    g.add_argument(
        "--decoder-device",
        metavar="DEVICE",
        help="where the decoder's VAE runs, e.g. cuda:4: a GPU of its own keeps the decode off the "
        "DiT's GPU (default: --device); docs/operations.md, 'GPU layouts'",
    )
    g.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 (e4m3) linear layers in the DiT: half the weight memory, faster on Ada/Hopper (docs/performance.md)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT blocks (about a minute at start-up, then ~35%% faster per block)",
    )
    g.add_argument(
        "--cache-sets",
        type=int,
        choices=(1,),
        default=None,
        help="1: one KV cache set refreshed by a clean pass per block (less memory, one more "
        "forward per block) instead of one set per sampling step",
    )
    g.add_argument(
        "--kv-fp8",
        action="store_true",
        help="store the DiT's KV cache in FP8 (e4m3): half the cache memory, lets 704*384 fit a "
        "24 GB card with --fp8 --cache-sets 1 (docs/performance.md)",
    )
    g.add_argument(
        "--fp8-attention",
        action="store_true",
        help="the DiT's self-attention with FP8 products on Hopper over the FP8 KV cache (implies --kv-fp8): "
        'faster at 704*384, an approximation (docs/performance.md, "FP8 attention")',
    )
    g.add_argument(
        "--fp8-attention-kernel",
        choices=FP8_ATTENTION_KERNELS,
        default=None,
        help="--fp8-attention's kernel (implies --fp8-attention): cuDNN's (Hopper, needs nvidia-cudnn-frontend), "
        "our Triton kernel of the same arithmetic (from compute capability 8.9; the values stored keys-last; "
        "7%% slower than cuDNN's on an H100) or FlashInfer's (Hopper; built once with nvcc from "
        "flashinfer-python's headers; its probabilities scaled by 448; the DiT 2%% slower than with cuDNN's on an "
        f"H100) (default: {DEFAULT_FP8_ATTENTION_KERNEL})",
    )
    g.add_argument(
        "--fused-norms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --fp8: each residual add + LayerNorm + modulation + FP8 quantisation of the DiT "
        "in one Triton kernel instead of torch.compile's (same arithmetic; default on with --fp8 on a "
        "CUDA GPU with CUDA graphs, without per-avatar LoRAs or FSDP: 704*384 blocks 11%% faster; "
        "docs/performance.md, "
        '"Fused norms")',
    )
    g.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay each steady-state DiT step from a CUDA graph (default on a GPU: +12%% at "
        "384*256, +1%% at 704*384 on an H100)",
    )
    g.add_argument(
        "--offload-text-kv",
        action="store_true",
        help="keep the DiT's text key/value projections (2 GB in FP8) in pinned CPU memory: they "
        "run once per session; with --fp8 --cache-sets 1 --kv-fp8 and --infer_frames 24 the "
        "704*384 pipeline fits 24 GB (docs/performance.md)",
    )
    g.add_argument(
        "--audio-encoders",
        default="wav2vec2",
        metavar="NAMES",
        help="audio encoders the encoder loads, comma-separated, from wav2vec2 (what the model was "
        "trained with) and whisper; a request picks one with audio_encoder (default: wav2vec2)",
    )
    g.add_argument(
        "--whisper-dir",
        metavar="FOLDER",
        help="WhisperModel checkpoint for the whisper audio encoder (e.g. whisper-medium: 1024 wide, "
        "24 layers, as the DiT's audio input); needed with --ckpt_dir, else random weights",
    )
    g.add_argument(
        "--clip-image",
        nargs="?",
        const=True,
        default=False,
        metavar="FOLDER",
        help="load a CLIPVisionModel (from FOLDER, e.g. clip-vit-large-patch14; without FOLDER: random "
        "weights, tiny or --random-weights only) so requests can ask for the portrait's identity "
        "embedding (clip_embedding); the DiT does not use it",
    )
    g.add_argument(
        "--latent-decoder",
        choices=("full", "light"),
        default="full",
        help="full (default): the Wan2.1 VAE's decoder, what the model was trained with; light: "
        "TAEHV's tiny decoder for Wan 2.1 latents (taew2_1), several times faster, an approximation "
        '(docs/performance.md, "Light decoder")',
    )
    g.add_argument(
        "--light-decoder-path",
        metavar="FILE",
        help="the light decoder's weights, taew2_1.pth or .safetensors from github.com/madebyollin/taehv; "
        "needed with --ckpt_dir, else random weights",
    )
    g.add_argument(
        "--memory-plan",
        choices=("auto", "off"),
        default="auto",
        help="auto (default): on a GPU, without --fp8/--cache-sets/--kv-fp8, choose them (and where "
        "the encoders run) from the free memory before loading, for the largest preset that "
        "can fit; off: as given",
    )
    g.add_argument(
        "--trace-file",
        help="append this process's OpenTelemetry spans to FILE as JSON lines "
        "(OTLP is used instead when OTEL_EXPORTER_OTLP_ENDPOINT is set)",
    )


def _add_avatar_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-avatar LoRAs (docs/operations.md, Per-avatar LoRA)")
    g.add_argument(
        "--avatar-lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register a LoRA a request picks by lora_id NAME (repeatable); applied unmerged on top of "
        "the base (and its --lora_path), validated at start-up like check-weights",
    )
    g.add_argument(
        "--max-loras",
        type=int,
        default=None,
        metavar="N",
        help="avatar LoRAs the generator holds on its device at once, least recently used dropped (default 4)",
    )


def _avatar_loras(args) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in getattr(args, "avatar_lora", None) or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--avatar-lora {item}: expected NAME=PATH, e.g. acme=/weights/acme/lora.safetensors")
        pairs.append((name, path))
    return tuple(pairs)


def model_spec(args):
    from avatar.errors import InvalidInput
    from avatar.presets import (
        DEFAULT_FP8_ATTENTION_KERNEL,
        DecoderOptions,
        EncoderOptions,
        GeneratorOptions,
        ModelSpec,
    )

    name = args.model or ("s2v-14b" if args.ckpt_dir or args.random_weights else "tiny")
    if name == "s2v-14b" and not (args.ckpt_dir or args.random_weights):
        raise UserError("--model s2v-14b needs --ckpt_dir (or --random-weights for benchmarks)")
    audio_encoders = tuple(n.strip() for n in args.audio_encoders.split(",") if n.strip())
    # `generate` without --server starts its own mesh: it loads the encoder the request names.
    wanted = getattr(args, "audio_encoder", None)
    if wanted and not getattr(args, "server", None) and wanted not in audio_encoders:
        audio_encoders += (wanted,)
    clip_image = args.clip_image or (getattr(args, "clip_embedding", False) and not getattr(args, "server", None))
    fp8 = getattr(args, "fp8", False)
    # naming a kernel for FP8 attention asks for it, as --fp8-attention asks for the FP8 cache
    fp8_attention_kernel = getattr(args, "fp8_attention_kernel", None)
    fp8_attention = getattr(args, "fp8_attention", False) or fp8_attention_kernel is not None
    try:
        generator_options = GeneratorOptions(
            cache_sets=args.cache_sets,
            kv_dtype="float8_e4m3fn" if args.kv_fp8 or fp8_attention else None,
            cuda_graphs=args.cuda_graphs,
            offload_text_projections=args.offload_text_kv,
            fp8_attention=fp8_attention,
            fp8_attention_kernel=fp8_attention_kernel or DEFAULT_FP8_ATTENTION_KERNEL,
            fused_norms=getattr(args, "fused_norms", None),
        )
        encoder_options = EncoderOptions(
            audio_encoders=audio_encoders,
            whisper_dir=args.whisper_dir,
            clip_image=bool(clip_image),
            clip_dir=clip_image if isinstance(clip_image, str) else None,
        )
        decoder_options = DecoderOptions(
            kind=getattr(args, "latent_decoder", "full"),
            light_path=getattr(args, "light_decoder_path", None),
        )
        spec = ModelSpec(
            name=name,
            ckpt_dir=args.ckpt_dir,
            lora_path=args.lora_path,
            random_weights=args.random_weights,
            device=args.device,
            encoder_device=args.encoder_device,
            decoder_device=args.decoder_device,
            fp8=fp8,
            compile=getattr(args, "compile", False),
            generator_options=generator_options,
            encoder_options=encoder_options,
            decoder_options=decoder_options,
            avatar_loras=_avatar_loras(args),
            **({"max_loras": args.max_loras} if getattr(args, "max_loras", None) is not None else {}),
        )
    except InvalidInput as exc:
        raise UserError(str(exc)) from None
    chosen = fp8 or generator_options.cache_sets or generator_options.kv_dtype  # what the plan would choose
    # Under torchrun (TPP) every rank holds one step's cache set: the single-GPU plan does not apply.
    tpp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (
        getattr(args, "memory_plan", "off") == "auto"
        and spec.device.startswith("cuda")
        and not spec.is_tiny
        and not chosen
        and not tpp
    ):
        from avatar.errors import ResourceExhausted
        from avatar.memory_planner import plan_for_device

        try:
            spec, plan, req = plan_for_device(spec)
        except ResourceExhausted as exc:
            raise UserError(str(exc).replace("\n", " ")) from None
        print(f"avatar: memory plan for up to {req.size}: {plan.describe()}", file=sys.stderr)
    return spec


def _add_serving_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capacity and operations")
    g.add_argument(
        "--max-sessions",
        type=int,
        default=4,
        metavar="N",
        help="sessions the gateway/generator runs at once (default 4)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=8,
        metavar="N",
        help="sessions that may wait for a slot; beyond: RESOURCE_EXHAUSTED with a retry hint (default 8)",
    )
    g.add_argument(
        "--max-per-client",
        type=int,
        default=0,
        metavar="N",
        help="public API: running + waiting sessions per client (its client certificate, else its "
        "API token when --auth-token is set, else its IP address); 0: no cap (default)",
    )
    g.add_argument(
        "--encoder-concurrency",
        type=int,
        default=2,
        metavar="N",
        help="encoder: image and prompt encodes run at once (default 2)",
    )
    g.add_argument(
        "--encoder-queue",
        type=int,
        default=8,
        metavar="N",
        help="encoder: encodes that may wait; beyond: RESOURCE_EXHAUSTED (default 8)",
    )
    g.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep torch.compile's caches (inductor FX graphs, Triton kernels) in DIR: a restart "
        "with --compile loads them instead of compiling for minutes (mount it as a volume)",
    )
    g.add_argument(
        "--metrics-port",
        type=arg_types.port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )
    g.add_argument(
        "--grace",
        type=arg_types.non_negative_seconds,
        default=None,
        metavar="S",
        help="on SIGTERM: seconds in-flight streams get to finish before they are cancelled",
    )
    g.add_argument(
        "--max-audio-s",
        type=arg_types.positive_seconds,
        default=None,
        metavar="S",
        help="gateway: refuse speech longer than S seconds (default 600)",
    )


def build_parser() -> argparse.ArgumentParser:
    from avatar.app.serve import DEFAULT_LISTEN, ROLES
    from avatar.presets import AUDIO_ENCODERS
    from avatar.security import add_security_args

    parser = argparse.ArgumentParser(prog="avatar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="host mesh services (default: all four in one process)")
    p.add_argument("--role", choices=ROLES, default="all")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT")
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the hd and preview presets through the encoder, the generator and the decoder "
        "before reporting SERVING (default: with --compile, which compiles there, so no request "
        "waits for compilation or a model's first call)",
    )
    p.add_argument(
        "--warmup-shape",
        action="append",
        default=[],
        metavar="WxH[@STEPS][/FRAMES]",
        help="also warm up this video size (exactly as a stream's header reports it), with STEPS "
        "sampling steps and FRAMES frames per clip (default: the preview preset's, what a request "
        "naming neither gets), e.g. 384x256@4; repeatable; implies --warmup",
    )
    p.add_argument("--encoder", metavar="ADDR", help="EncoderService address (--role gateway)")
    p.add_argument("--generator", metavar="ADDR", help="GeneratorService address (--role gateway)")
    p.add_argument("--decoder", metavar="ADDR", help="DecoderService address (--role gateway)")
    p.add_argument(
        "--processes",
        choices=("auto", "one", "per-service"),
        default="auto",
        help="--role all: one process for the four services, or per-service: the encoder, generator "
        "and decoder in child processes on loopback (the GIL is not shared: the VAE decode ran 2.3x "
        "faster, docs/performance.md run O); auto (default): per-service on a GPU, one on CPU",
    )
    p.add_argument(
        "--parallel",
        metavar="tpp=N,fsdp=F",
        help="under torchrun, how the generator's ranks split the work: tpp stages (a DiT each, "
        "steps pipelined) x fsdp shards (FSDP2: 1/F of the weights each, for small cards); the "
        "degrees multiply to the processes started (default: tpp over every rank)",
    )
    _add_model_flags(p)
    _add_avatar_lora_flags(p)
    _add_serving_flags(p)
    add_security_args(p)
    converse_cmd.add_serve_flags(p)
    web_cmd.add_serve_flags(p)
    from avatar.app import ray_mesh

    ray_mesh.add_serve_flags(p)

    p = sub.add_parser("generate", help="render a talking-avatar video from a portrait and speech")
    p.add_argument("--image", required=True, help="portrait: PNG, JPEG or WebP")
    p.add_argument("--audio", required=True, help="speech: WAV, FLAC, MP3, OGG or M4A")
    p.add_argument("--prompt", default="", help="text describing the scene")
    p.add_argument(
        "--preset", choices=("preview", "standard", "hd"), default=None, help="generation defaults (default: preview)"
    )
    p.add_argument("--size", default="", help='pixel area "W*H"; the aspect follows the image, e.g. 704*384')
    p.add_argument("--num_clip", type=int, default=0, help="clips to generate at most (0: the whole audio)")
    p.add_argument("--infer_frames", type=int, default=0, help="video frames per clip (0: the preset's)")
    p.add_argument("--sample_steps", type=int, default=0, help="denoising steps per block (0: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default 420)")
    p.add_argument(
        "--enable_online_decode",
        action="store_true",
        help="accepted for LiveAvatar compatibility: decoding is always online (per block)",
    )
    p.add_argument(
        "--server",
        metavar="ADDR",
        help="a running gateway, e.g. 127.0.0.1:50051 (default: start the mesh in this process)",
    )
    p.add_argument("--out", required=True, help="output video, e.g. out/demo.mp4 (OUT.json is written beside it)")
    p.add_argument(
        "--timeout", type=arg_types.positive_seconds, default=None, help="deadline of the request in seconds"
    )
    p.add_argument(
        "--audio-encoder",
        choices=AUDIO_ENCODERS,
        default=None,
        help="audio encoder of the speech features (default wav2vec2, what the model was trained with); "
        "without --server the embedded mesh loads it",
    )
    p.add_argument(
        "--clip-embedding",
        action="store_true",
        help="also get the portrait's CLIP identity embedding, written to OUT.json (clip_embedding)",
    )
    p.add_argument(
        "--lora-id",
        default="",
        metavar="NAME",
        help="render with the avatar LoRA registered under NAME (serve --avatar-lora NAME=PATH; "
        "without --server: this command's --avatar-lora); default: the base model",
    )
    _add_model_flags(p)
    _add_avatar_lora_flags(p)
    add_security_args(p)

    _add_model_flags(converse_cmd.add_parser(sub))  # live sessions: app/converse_cmd.py
    _add_model_flags(livekit_worker.add_parser(sub))  # LiveKit avatar: app/livekit_worker.py

    p = sub.add_parser("batch", help="one video per JSON profile in a folder; resumable, with a manifest")
    from avatar.app import batch

    batch.add_arguments(p)
    _add_model_flags(p)
    add_security_args(p)

    p = sub.add_parser("gpu-monitor", help="print or log GPU memory/utilisation/temperature, like nvidia-smi")
    from avatar.app import gpu_monitor

    gpu_monitor.add_arguments(p)

    p = sub.add_parser(
        "check-weights",
        help="check a checkpoint folder against the model's expected tensors "
        "(reads headers only: seconds, even for 44 GB)",
    )
    p.add_argument("--ckpt_dir", required=True, help="the Wan2.2-S2V-14B folder (or the folder holding it)")
    p.add_argument("--lora_path", help="LiveAvatar LoRA (liveavatar.safetensors) to match against the DiT")
    p.add_argument("--model", choices=("s2v-14b", "tiny"), default="s2v-14b", help="shapes to expect")
    p = sub.add_parser("download-weights", help="download Wan2.2-S2V-14B and the LiveAvatar LoRA (resumable)")
    p.add_argument("--ckpt_dir", required=True, help="destination folder")
    p.add_argument("--no-lora", action="store_true", help="only the Wan2.2-S2V-14B files")
    return parser


def main(argv: list[str] | None = None) -> int:
    from avatar.app.embedded import SetupError
    from avatar.client import GenerateError, InvalidRequest

    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "generate":
            return run_stoppable(cmd_generate(args), args.command)
        if args.command == "converse":
            return asyncio.run(converse_cmd.run(args))
        if args.command == "livekit-worker":
            livekit_worker.exit_now(run_stoppable(livekit_worker.run(args), args.command))
        if args.command == "batch":
            from avatar.app.batch import example_command, run

            if args.example:
                return example_command(args)
            return run_stoppable(run(args, None if args.server else model_for(args)), args.command)
        if args.command == "gpu-monitor":
            from avatar.app.gpu_monitor import run

            return run(args)
        if args.command == "check-weights":
            return cmd_check_weights(args)
        return cmd_download_weights(args)
    except (UserError, SetupError) as exc:
        print(f"avatar {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InvalidRequest as exc:
        print(f"avatar {args.command}: error: {exc.details}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GenerateError as exc:
        print(f"avatar {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"avatar {args.command}: interrupted", file=sys.stderr)
        return 130


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_stoppable(work, command: str) -> int:
    """asyncio.run(work), where SIGTERM, SIGINT and SIGHUP cancel the work so its cleanup runs
    (temp files removed, the embedded mesh stopped); exit code 128 + the signal's number.
    SIGKILL cannot be caught: the next run removes what it left (avatar.client.remove_stale_parts)."""
    received: list[signal.Signals] = []

    async def runner():
        task, loop = asyncio.current_task(), asyncio.get_running_loop()

        def stop(sig):
            if not received:  # a second signal must not interrupt the cleanup of the first
                task.cancel()
            received.append(sig)

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await work
        except asyncio.CancelledError:
            if received:
                return None
            raise

    rc = asyncio.run(runner())
    if received:
        print(f"avatar {command}: stopped by {received[0].name}; nothing half-written was left", file=sys.stderr)
        return 128 + received[0]
    return rc


def cmd_serve(args) -> int:
    from avatar.admission import AdmissionConfig
    from avatar.app import ray_mesh
    from avatar.app.serve import GRACE_S, ServeConfig, serve_forever
    from avatar.logging_setup import setup_logging
    from avatar.security import SecurityConfig

    setup_logging(f"avatar-{args.role}")
    try:
        ray_mesh.check_flags(args)
        security = SecurityConfig.from_args(args)
        admission = AdmissionConfig(args.max_sessions, args.max_queue, args.max_per_client)
        if args.encoder_concurrency < 1 or args.encoder_queue < 0:
            raise ValueError("--encoder-concurrency must be at least 1 and --encoder-queue not negative")
        encoder_admission = AdmissionConfig(args.encoder_concurrency, args.encoder_queue)
        parallel = parallel_config(args)
        model = model_for(args, "gateway" if args.ray else args.role)  # --ray: replicas load it on their nodes
        warmup, warmup_shapes = warmup_flags(args, model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cfg = ServeConfig(
        role=args.role,
        listen=args.listen,
        encoder=args.encoder,
        generator=args.generator,
        decoder=args.decoder,
        model=model,
        trace_file=args.trace_file,
        security=security,
        admission=admission,
        metrics_port=args.metrics_port,
        grace_s=GRACE_S if args.grace is None else args.grace,
        max_audio_s=args.max_audio_s,
        warmup=warmup,
        warmup_shapes=warmup_shapes,
        live=converse_cmd.live_config(args),
        compile_cache=args.compile_cache,
        encoder_admission=encoder_admission,
        parallel=parallel,
        web=web_cmd.web_config(args, security),
    )
    from avatar.app import processes
    from avatar.errors import WeightsError

    try:
        split = processes.per_service(args.processes, args.role, args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        if args.ray:
            mesh = ray_mesh.RayMeshConfig.load(args.ray_config, gpu=cfg.model.device.startswith("cuda"))
            asyncio.run(ray_mesh.serve(cfg, args.ray, mesh))
            return 0
        asyncio.run(processes.serve_per_service(cfg) if split else serve_forever(cfg))
    except (ValueError, OSError, WeightsError) as exc:
        raise UserError(str(exc).replace("\n", " ")) from None
    except processes.ChildFailed as exc:
        print(f"avatar serve: {exc}", file=sys.stderr)
        return 1
    return 0


def warmup_flags(args, model) -> tuple[bool | None, tuple]:
    """(--warmup, the --warmup-shape sizes): shapes imply the warm-up; ValueError where they cannot apply."""
    from avatar.app.serve import parse_warmup_shape

    shapes = tuple(parse_warmup_shape(text, model) for text in args.warmup_shape)
    if not shapes:
        return args.warmup, ()
    if args.warmup is False:
        raise ValueError("--warmup-shape asks for a warm-up that --no-warmup turns off: drop one of them")
    if args.role == "gateway":
        raise ValueError("--warmup-shape warms the encoder, generator and decoder up, not --role gateway")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--warmup-shape: a multi-GPU (torchrun) generator has no warm-up yet; drop the flag")
    return True, shapes


def parallel_config(args):
    """--parallel checked against the processes torchrun started (ValueError naming the degrees)."""
    from avatar.services.generator.distributed.parallel_config import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel and args.role != "generator":
        raise ValueError(f"--parallel applies to --role generator (under torchrun), not --role {args.role}")
    config = ParallelConfig.for_world(args.parallel, world) if args.parallel or world > 1 else None
    if config is not None and config.tpp > 1 and config.sharded:
        raise ValueError(
            f"--parallel {config.describe()}: TPP stages of sharded DiTs are not wired yet; "
            f"use tpp={world} (a DiT per rank) or fsdp={world} (one DiT sharded over all ranks)"
        )
    return config


def model_for(args, role: str = "all"):
    """model_spec(args) between checks of what it cannot see: --device before (the memory plan asks
    the device), the weight files after (a bad flag combination is the simpler thing to report).
    A newcomer gets one line saying what to do instead of a traceback from deep inside a load."""
    if role != "gateway" and args.device.startswith("cuda"):
        _check_cuda(args.device)
    if role != "gateway":
        for flag, device in (("--encoder-device", args.encoder_device), ("--decoder-device", args.decoder_device)):
            if device is not None:
                _check_device(flag, device)
    spec = model_spec(args)
    light = spec.decoder_options.light_path
    if role in ("all", "decoder") and light and not Path(light).expanduser().is_file():
        raise UserError(
            f"--light-decoder-path {light}: no such file; taew2_1.pth is published in github.com/madebyollin/taehv"
        )
    # --ray: the generator replicas register the LoRAs on their nodes (the files need not be on
    # the gateway's); a bad one fails a replica's start, and `serve` exits with its reason
    if spec.avatar_loras and not getattr(args, "ray", None):
        _check_avatar_loras(spec, role)
    if role != "gateway" and not args.random_weights:
        if args.ckpt_dir:
            _check_ckpt_dir(args.ckpt_dir)
        if args.lora_path and not Path(args.lora_path).expanduser().is_file():
            raise UserError(
                f"--lora_path {args.lora_path}: no such file; `avatar download-weights` fetches "
                f"LiveAvatar/liveavatar.safetensors"
            )
    return spec


def _check_avatar_loras(spec, role: str) -> None:
    """Every --avatar-lora validated against the DiT's shapes (headers only) before any model loads."""
    if role not in ("all", "generator"):
        raise UserError(f"--avatar-lora registers LoRAs with a generator: pass it to --role generator, not {role}")
    from avatar.errors import WeightsError
    from avatar.services.generator.engine import register_avatar_loras

    try:
        register_avatar_loras(spec)
    except WeightsError as exc:
        raise UserError(str(exc).replace("\n", " ")) from None


def _check_ckpt_dir(ckpt_dir: str) -> None:
    from avatar import checkpoints as ck

    fetch = f"fetch the weights with `avatar download-weights --ckpt_dir {ckpt_dir}`"
    path = Path(ckpt_dir).expanduser()
    if not path.is_dir():
        raise UserError(
            f"--ckpt_dir {ckpt_dir}: " + ("not a folder" if path.exists() else "no such folder") + f"; {fetch}"
        )
    if not any(path.iterdir()):
        raise UserError(f"--ckpt_dir {ckpt_dir} is empty; {fetch}")
    root = ck.resolve_ckpt_dir(path).root
    dit = (root / ck.DIT_INDEX, root / "diffusion_pytorch_model.safetensors")
    missing = [
        str(p.relative_to(root))
        for p in (
            root / ck.DIT_CONFIG,
            root / ck.VAE_FILE,
            root / ck.T5_FILE,
            root / ck.TOKENIZER_DIR,
            root / ck.WAV2VEC2_DIR,
        )
        if not p.exists()
    ]
    if not any(p.exists() for p in dit):
        missing.insert(1, dit[0].name)
    if missing:
        raise UserError(
            f"--ckpt_dir {ckpt_dir} is not a Wan2.2-S2V-14B folder: {', '.join(missing)} missing; "
            f"{fetch}, or see what is wrong with `avatar check-weights --ckpt_dir {ckpt_dir}`"
        )


def _check_cuda(device: str, flag: str = "--device") -> None:
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"{flag} {device}: {why} (torch {torch.__version__}); use {flag} cpu")
    index = device.partition(":")[2]
    if index and (not index.isascii() or not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise UserError(
            f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )


def _check_device(flag: str, device: str) -> None:
    """UserError unless `device` is cpu or a CUDA device this machine has."""
    if device == "cpu" or device.startswith("cuda:") or device == "cuda":
        if device != "cpu":
            _check_cuda(device, flag)
        return
    raise UserError(f"{flag} {device}: not a device here; use cpu, cuda or cuda:N")


def _read(path: str, what: str) -> bytes:
    """An input file's bytes, or UserError (used by `avatar converse`)."""
    from avatar.client import InvalidRequest, read_input

    try:
        return read_input(path, what)
    except InvalidRequest as exc:
        raise UserError(exc.details) from None


def _request(args):
    from avatar.client import read_input
    from avatar.v1 import avatar_pb2

    return avatar_pb2.GenerateRequest(
        image=read_input(args.image, "image"),
        audio=read_input(args.audio, "audio"),
        prompt=args.prompt,
        size=args.size,
        preset=args.preset or "",
        num_clip=args.num_clip,
        infer_frames=args.infer_frames,
        sample_steps=args.sample_steps,
        seed=args.seed,
        audio_encoder=args.audio_encoder or "",
        clip_embedding=args.clip_embedding,
        lora_id=args.lora_id,
    )


async def cmd_generate(args) -> int:
    from avatar.app.embedded import client_for

    request = _request(args)
    out = Path(args.out)
    model = None
    if args.server and args.avatar_lora:
        raise UserError("--avatar-lora is for the mesh this command starts; with --server, the server registers them")
    if not args.server:  # with --server the model is the server's
        model = model_for(args)
    progress = _Progress()
    try:
        async with client_for(args, model) as client:
            if client.warning:
                print(f"avatar generate: {client.warning}", file=sys.stderr)
            saved = await client.generate_to_file(
                request,
                out,
                timeout_s=args.timeout,
                on_event=progress,
                span_name="avatar generate",
                server=args.server or "embedded",
                sidecar={
                    # no secrets in the sidecar
                    "parameters": {k: v for k, v in vars(args).items() if k != "command" and "token" not in k},
                    "model": {
                        "ckpt_dir": args.ckpt_dir,
                        "lora_path": args.lora_path,
                        "random_weights": args.random_weights,
                    },
                },
            )
    finally:
        progress.close()
    header, status = saved.header, saved.status
    print(
        f"avatar generate: wrote {out} ({status.frames} frames, {header.width}x{header.height}, "
        f"{header.duration_s:.2f} s) in {saved.total_s:.1f} s, first fragment after "
        f"{status.time_to_first_fragment_s:.2f} s",
        file=sys.stderr,
    )
    if status.truncation:
        print(f"avatar generate: note: the video covers only part of the audio: {status.truncation}", file=sys.stderr)
    if saved.audio_note:
        print(f"avatar generate: note: {saved.audio_note}", file=sys.stderr)
    return 0


class _Progress:
    """The progress bar on stderr, from the stream's header and fragments."""

    def __init__(self):
        self.bar = None

    def __call__(self, msg) -> None:
        kind = msg.WhichOneof("event")
        if kind == "header":
            if "noise" in msg.header.model:
                print(f"avatar generate: note: model is {msg.header.model}", file=sys.stderr)
            from tqdm import tqdm

            h = msg.header
            self.bar = tqdm(
                total=h.expected_fragments,
                unit="block",
                file=sys.stderr,
                desc=f"{h.width}x{h.height} {h.total_frames} frames",
                leave=True,
            )
        elif kind == "fragment" and self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_check_weights(args) -> int:
    """Prints one line per component; exit 0 when complete, 1 when something is missing or wrong."""
    from avatar.app.weights_tools import check_weights

    try:
        report = check_weights(args.ckpt_dir, args.lora_path, model=args.model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(report)
    return 0 if report.ok else 1


def cmd_download_weights(args) -> int:
    from avatar.app.weights_tools import download_weights
    from avatar.errors import WeightsError

    try:
        got = download_weights(args.ckpt_dir, lora=not args.no_lora)
    except WeightsError as exc:
        print(f"avatar download-weights: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded: use --ckpt_dir {got.ckpt_dir}" + (f" --lora_path {got.lora_path}" if got.lora_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
