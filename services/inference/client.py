"""Client of the inference service: :class:`InferenceClient` and the command line
``lorafleet chat | generate | models | load | unload``.

    lorafleet chat [--adapter NAME[@V]] [--system TEXT]        interactive REPL, tokens streamed
    lorafleet chat --message "How are you?" [--adapter A]      one question, streamed, then exit
    lorafleet generate "Once upon a time" [--adapter A]        one raw prompt (no template), streamed
    lorafleet models                                           base models and adapters with state
    lorafleet load NAME[@V] | lorafleet unload NAME[@V]        explicit adapter load / unload
    lorafleet load --model FULL@V | lorafleet unload --model FULL   a published full model, likewise

The address, token and TLS CA come from flags or LORAFLEET_INFERENCE_ADDR, LORAFLEET_INFERENCE_TOKEN
(or a file: --token-file, LORAFLEET_INFERENCE_TOKEN_FILE),
LORAFLEET_INFERENCE_TLS_CA (like the trainer client). Sampling flags left unset take the server's
defaults; ``--temperature 0`` is greedy. Errors print the server's status code and message and exit
with 2; a refused request prints each field problem the status details carry (``google.rpc.BadRequest``)
on its own line. A REPL turn that fails prints the error and goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import grpc

from lorafleet.errors import LorafleetError
from lorafleet.v1 import inference_pb2 as pb
from lorafleet.v1 import inference_pb2_grpc
from services.common.auth import add_secret_refusal, read_token
from services.common.field_errors import field_violations
from services.common.grpc_util import channel

_FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}
ROLES = ("system", "user", "assistant")


def finish_name(reason: int) -> str:
    return _FINISH_NAMES.get(reason, str(reason))


@dataclass
class StreamResult:
    """A whole streamed answer: text, token ids, and the usage of the last chunk."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    usage: pb.Usage | None = None


class InferenceClient:
    """A small wrapper over the stub: the bearer token (if any) on every call, optional TLS, and
    a default deadline per call (``timeout``; None = none).

    Example::

        with InferenceClient("127.0.0.1:50052") as client:
            for chunk in client.chat_stream([("user", "hi")], adapter="support@2"):
                print(chunk.text, end="", flush=True)
    """

    def __init__(self, addr: str, token: str = "", tls_ca: str = "", timeout: float | None = 300.0) -> None:
        self.addr = addr
        self.channel = channel(addr, tls_ca or None, token=token)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.timeout = timeout

    # -- requests ----------------------------------------------------------------------------

    @staticmethod
    def messages(items: Sequence[tuple[str, str]]) -> list[pb.ChatMessage]:
        return [pb.ChatMessage(role=role, content=content) for role, content in items]

    def generate(
        self, prompt: str, adapter: str = "", model: str = "", sampling: pb.SamplingParams | None = None
    ) -> pb.GenerateResponse:
        request = pb.GenerateRequest(model=model, adapter=adapter, prompt=prompt, sampling=sampling)
        return self.stub.Generate(request, timeout=self.timeout)

    def generate_stream(
        self, prompt: str, adapter: str = "", model: str = "", sampling: pb.SamplingParams | None = None
    ) -> Iterator[pb.GenerateChunk]:
        request = pb.GenerateRequest(model=model, adapter=adapter, prompt=prompt, sampling=sampling)
        yield from self._stream(self.stub.GenerateStream(request, timeout=self.timeout))

    def chat(
        self,
        messages: Sequence[tuple[str, str]],
        adapter: str = "",
        model: str = "",
        sampling: pb.SamplingParams | None = None,
    ) -> pb.GenerateResponse:
        request = pb.ChatRequest(
            model=model, adapter=adapter, messages=self.messages(messages), sampling=sampling
        )
        return self.stub.Chat(request, timeout=self.timeout)

    def chat_stream(
        self,
        messages: Sequence[tuple[str, str]],
        adapter: str = "",
        model: str = "",
        sampling: pb.SamplingParams | None = None,
    ) -> Iterator[pb.GenerateChunk]:
        request = pb.ChatRequest(
            model=model, adapter=adapter, messages=self.messages(messages), sampling=sampling
        )
        yield from self._stream(self.stub.ChatStream(request, timeout=self.timeout))

    @staticmethod
    def _stream(call: Any) -> Iterator[pb.GenerateChunk]:
        """Yield the chunks; cancel the call when the consumer stops early (frees the server's slot)."""
        try:
            yield from call
        finally:
            call.cancel()

    def score(self, pairs: Sequence[tuple[str, str]], adapter: str, model: str = "") -> pb.ScoreResponse:
        """Reward-model scores of ``(prompt, response)`` pairs, one per pair (higher = preferred)."""
        request = pb.ScoreRequest(
            model=model, adapter=adapter, pairs=[pb.ScorePair(prompt=p, response=r) for p, r in pairs]
        )
        return self.stub.Score(request, timeout=self.timeout)

    def list_models(self) -> pb.ListModelsResponse:
        """Base models and every adapter version, all pages of the listing merged."""
        return collect_model_pages(lambda request: self.stub.ListModels(request, timeout=self.timeout))

    def load_adapter(self, adapter: str, model: str = "") -> pb.AdapterStatus:
        request = pb.LoadAdapterRequest(model=model, adapter=adapter)
        return self.stub.LoadAdapter(request, timeout=self.timeout)

    def unload_adapter(self, adapter: str, model: str = "") -> pb.AdapterStatus:
        request = pb.UnloadAdapterRequest(model=model, adapter=adapter)
        return self.stub.UnloadAdapter(request, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def print_stream(chunks: Iterator[pb.GenerateChunk], out: IO[str]) -> StreamResult:
    """Write each text delta to ``out`` as it arrives; returns the whole answer."""
    result = StreamResult()
    for chunk in chunks:
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        result.text += chunk.text
        result.token_ids.extend(chunk.token_ids)
        if chunk.HasField("usage"):
            result.usage = chunk.usage
    out.write("\n")
    out.flush()
    return result


def usage_line(usage: pb.Usage | None) -> str:
    if usage is None:
        return "[no usage: the stream ended early]"
    adapter = usage.adapter or "base model"
    template = f", template {usage.template}" if usage.template else ""
    return (
        f"[{adapter}{template}: {usage.prompt_tokens} prompt + {usage.generated_tokens} generated tokens, "
        f"finish {finish_name(usage.finish_reason)}, first token {usage.time_to_first_token_s * 1000:.0f} ms, "
        f"total {usage.total_time_s:.2f} s]"
    )


def collect_model_pages(
    call: Callable[[pb.ListModelsRequest], pb.ListModelsResponse],
) -> pb.ListModelsResponse:
    """Follow ``next_page_token`` until the last page; one response with every adapter."""
    merged = pb.ListModelsResponse()
    token = ""
    for _ in range(100_000):  # a server that never stops paging is a bug, not a reason to hang
        page = call(pb.ListModelsRequest(page_token=token))
        if not token:
            merged.models.extend(page.models)
        merged.adapters.extend(page.adapters)
        token = page.next_page_token
        if not token:
            break
    return merged


# -- command line ---------------------------------------------------------------------------------


def add_connection_args(ap: argparse.ArgumentParser) -> None:
    env = os.environ.get
    ap.add_argument(
        "--target",
        "--addr",
        dest="target",
        default=env("LORAFLEET_INFERENCE_ADDR", "127.0.0.1:50052"),
        help="HOST:PORT of the inference service (env LORAFLEET_INFERENCE_ADDR)",
    )
    ap.add_argument(
        "--token-file",
        default=env("LORAFLEET_INFERENCE_TOKEN_FILE", ""),
        help="file holding the bearer token (or set LORAFLEET_INFERENCE_TOKEN)",
    )
    add_secret_refusal(ap, "--token", "use --token-file or LORAFLEET_INFERENCE_TOKEN")
    ap.add_argument(
        "--tls-ca",
        default=env("LORAFLEET_INFERENCE_TLS_CA", ""),
        help="PEM CA of a TLS server (env LORAFLEET_INFERENCE_TLS_CA)",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline of each call in seconds")
    ap.add_argument(
        "--model",
        default="",
        help="base model, or published full model NAME[@V] (optional when the server has one base)",
    )


def describe_error(err: grpc.RpcError) -> str:
    """``CODE: message`` of a failed call; when the status details list field problems, the message's
    first line and then one ``- field=value: problem`` line each."""
    code = err.code().name if callable(getattr(err, "code", None)) else "UNKNOWN"
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    violations = field_violations(err)
    if not violations:
        return f"{code}: {details}"
    lines = [f"{code}: {(details or '').splitlines()[0] if details else 'invalid request'}"]
    lines += [f"  - {v.description}" for v in violations]
    return "\n".join(lines)


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    """One flag per field of the protobuf ``SamplingParams`` (``sampling_from_args`` reads them by
    name), plus ``--adapter`` and ``--quiet``."""
    ap.add_argument("--adapter", default="", help="NAME or NAME@VERSION; empty = the base model")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (the server default)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=None)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--presence-penalty", type=float, default=None, help="[-2, 2]; 0 = off (OpenAI's)")
    ap.add_argument("--frequency-penalty", type=float, default=None, help="[-2, 2]; 0 = off (OpenAI's)")
    ap.add_argument("--logprobs", type=int, default=None, help="report token logprobs and N alternatives")
    ap.add_argument("--prompt-logprobs", type=int, default=None, help="the same for the prompt tokens")
    ap.add_argument("--n", type=int, default=None, help="samples per request (the first is printed)")
    ap.add_argument("--quiet", "-q", action="store_true", help="print only the answer, no usage line")


def sampling_from_args(args: argparse.Namespace) -> pb.SamplingParams:
    """The flags the user set, by the proto field's name; unset ones stay unset so the server's
    defaults apply."""
    s = pb.SamplingParams()
    for f in s.DESCRIPTOR.fields:
        value = getattr(args, f.name)
        if f.is_repeated:
            getattr(s, f.name).extend(value)
        elif value is not None:
            setattr(s, f.name, value)
    return s


def _print_models(response: pb.ListModelsResponse, out: IO[str]) -> None:
    out.write(
        f"{'MODEL':<24} {'STATE':<9} {'QUANT':<6} {'DTYPE':<5} {'CONTEXT':>7}  {'TEMPLATE':<10} REASON\n"
    )
    for m in response.models:
        out.write(
            f"{m.name:<24} {m.state:<9} {m.quantization:<6} {m.dtype:<5} {m.max_context:>7}  "
            f"{m.template:<10} {m.reason}\n"
        )
    out.write(
        f"\n{'ADAPTER':<28} {'MODEL':<12} {'STATE':<10} {'RANK':>4}  {'METHOD':<7} {'TEMPLATE':<10} REASON\n"
    )
    for a in sorted(response.adapters, key=lambda a: (a.model, a.name, a.version)):
        out.write(
            f"{a.ref:<28} {a.model:<12} {a.state:<10} {a.rank:>4}  {a.method:<7} {a.template:<10} "
            f"{a.reason}\n"
        )


def _print_status(status: pb.AdapterStatus, out: IO[str]) -> None:
    reason = f" ({status.reason})" if status.reason else ""
    out.write(f"{status.ref} on {status.model}: {status.state}{reason}\n")


def _repl(
    client: InferenceClient, args: argparse.Namespace, sampling: pb.SamplingParams, inp: IO[str], out: IO[str]
) -> int:
    """Read a line, stream the answer, keep the conversation; ``/reset`` clears it, ``/exit`` or EOF
    ends. A failed turn prints the error and is dropped from the history."""
    history: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    who = args.adapter or "base model"
    out.write(
        f"chatting with {who} at {client.addr}; /reset clears the conversation, /exit or Ctrl-D quits\n"
    )
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = history[:1] if args.system else []
            out.write("(conversation cleared)\n")
            continue
        turn = [*history, ("user", text)]
        try:
            result = print_stream(client.chat_stream(turn, args.adapter, args.model, sampling), out)
        except grpc.RpcError as e:
            out.write(f"\nerror: {describe_error(e)}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer (the call is cancelled), not the REPL
            out.write("\n(interrupted)\n")
            continue
        if not args.quiet:
            out.write(usage_line(result.usage) + "\n")
        history = [*turn, ("assistant", result.text)]


def main(command: str, argv: list[str], inp: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """``lorafleet chat | generate | score | models | load | unload``; returns the exit status."""
    inp = sys.stdin if inp is None else inp
    out = sys.stdout if out is None else out
    ap = argparse.ArgumentParser(prog=f"lorafleet {command}")
    add_connection_args(ap)
    if command == "chat":
        add_sampling_args(ap)
        ap.add_argument("--message", "-m", default=None, help="ask one question, print the answer, exit")
        ap.add_argument("--system", default="", help="system message")
    elif command == "generate":
        add_sampling_args(ap)
        ap.add_argument("prompt", help="the raw prompt (no chat template); '-' reads it from stdin")
    elif command == "score":
        ap.add_argument("--adapter", required=True, help="the reward model, NAME or NAME@VERSION")
        ap.add_argument("--prompt", required=True, help="the prompt every response answers")
        ap.add_argument("responses", nargs="+", help="responses to score; printed best first")
    elif command in ("load", "unload"):
        ap.add_argument(
            "adapter",
            nargs="?",
            default="",
            help="NAME or NAME@VERSION; leave it out to load or unload the published full model --model names",
        )
    elif command != "models":
        raise ValueError(f"unknown inference client command {command!r}")
    args = ap.parse_args(argv)
    try:
        token = read_token(os.environ.get("LORAFLEET_INFERENCE_TOKEN", ""), args.token_file, "token_file")
    except LorafleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2
    client = InferenceClient(args.target, token, args.tls_ca, args.timeout)
    try:
        if command == "models":
            _print_models(client.list_models(), out)
            return 0
        if command == "score":
            response = client.score([(args.prompt, r) for r in args.responses], args.adapter, args.model)
            for score, text in sorted(zip(response.scores, args.responses, strict=True), reverse=True):
                out.write(f"{score:+.4f}\t{text}\n")
            return 0
        if command == "load":
            _print_status(client.load_adapter(args.adapter, args.model), out)
            return 0
        if command == "unload":
            _print_status(client.unload_adapter(args.adapter, args.model), out)
            return 0
        sampling = sampling_from_args(args)
        if command == "generate":
            prompt = inp.read() if args.prompt == "-" else args.prompt
            result = print_stream(client.generate_stream(prompt, args.adapter, args.model, sampling), out)
        elif args.message is not None:
            messages = [("system", args.system)] if args.system else []
            messages.append(("user", args.message))
            result = print_stream(client.chat_stream(messages, args.adapter, args.model, sampling), out)
        else:
            return _repl(client, args, sampling, inp, out)
        if not args.quiet:
            print(usage_line(result.usage), file=sys.stderr)
        return 0 if result.usage is not None else 1
    except grpc.RpcError as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


__all__ = [
    "InferenceClient",
    "StreamResult",
    "describe_error",
    "finish_name",
    "main",
    "print_stream",
    "usage_line",
]
