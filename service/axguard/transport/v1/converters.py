"""Converters between axguard.v1 messages and engine types, one symmetric pair per message."""

from __future__ import annotations

import torch

# One enum ↔ name mapping, the client's (by the enum's names).
from axguard_client.client import method_name as enum_method_name
from axguard_client.client import method_value as enum_method_value

from ...engine import attribution
from ...engine.core import CheckItem, CheckResult, MethodScore, StageTiming, Verdict
from ...engine.model import ModelBundle
from ...engine.preprocess import (
    InputLimits,
    float32_array,
    image_from_encoded,
    tensor_from_bytes,
    tensor_to_bytes,
)
from ...errors import AxguardError, InvalidInput, field_within
from ...flag.artifact import CalibrationArtifact
from ...serving.dataplane import Answer, Answers, DiagnoseAsk, DiagnoseEvent, ModelDescription
from ...serving.quality import LabelOutcome
from ..status import status_for
from . import confidence_pb2 as pb

AX_PROCESS_BY_VALUE = {pb.AX_PROCESS_SUM: "sum", pb.AX_PROCESS_PRODUCT: "product"}
AX_PROCESS_VALUE = {name: value for value, name in AX_PROCESS_BY_VALUE.items()}


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Return a Tensor message (little-endian float32) for a tensor."""
    shape, data = tensor_to_bytes(tensor)
    return pb.Tensor(shape=shape, data=data)


def tensor_from_proto(message: pb.Tensor) -> torch.Tensor:
    """Return the tensor in a Tensor message, without range checks (for responses)."""
    return torch.from_numpy(float32_array(message.data, [int(s) for s in message.shape]))


def method_name(value: int, field: str = "methods") -> str:
    """Return the registered method name of an AttributionMethod value (by the enum's
    name, the client's mapping: ATTRIBUTION_METHOD_SALIENCY → "saliency"); UNSPECIFIED and
    unknowns are refused."""
    if value == pb.ATTRIBUTION_METHOD_UNSPECIFIED:
        raise InvalidInput("ATTRIBUTION_METHOD_UNSPECIFIED is not a method; leave the "
                           "list empty for the defaults", field=field)
    try:
        return attribution.get_method(enum_method_name(value)).name
    except (ValueError, InvalidInput):
        raise InvalidInput(f"unknown attribution method value {value}", field=field) from None


def method_names(values: list[int], field: str) -> tuple[str, ...]:
    """Return method names for AttributionMethod values; UNSPECIFIED is refused."""
    return tuple(method_name(value, field) for value in values)


def method_value(name: str) -> int:
    """Return the AttributionMethod value of a registered method name."""
    return enum_method_value(attribution.get_method(name).name)


def process_names(values: list[int], field: str) -> tuple[str, ...]:
    """Return AX process names for AxProcess values; UNSPECIFIED and unknowns are refused."""
    names = []
    for value in values:
        if value not in AX_PROCESS_BY_VALUE:
            raise InvalidInput(f"unknown AX process value {value}", field=field)
        names.append(AX_PROCESS_BY_VALUE[value])
    return tuple(names)


def image_from_proto(image: pb.Image, bundle: ModelBundle,
                     limits: InputLimits) -> torch.Tensor:
    """Return the (C, H, W) float32 [0, 1] pixels of an Image message, validated (errors
    name the request's `image` field; a batch item's are renamed by the data plane)."""
    source = image.WhichOneof("source")
    if source is None:
        raise InvalidInput("is missing: set image.encoded or image.tensor", field="image")
    if source == "encoded":
        return image_from_encoded(image.encoded, bundle.spec, limits, "image.encoded")
    return tensor_from_bytes(list(image.tensor.shape), image.tensor.data, bundle.spec,
                             field="image.tensor")


def prediction_message(logits: torch.Tensor, class_names: list[str]) -> pb.Prediction:
    """Return the Prediction message for one row of logits."""
    probs = torch.softmax(logits.float(), dim=0)
    cls = int(probs.argmax())
    return pb.Prediction(class_index=cls, class_name=class_names[cls],
                         probability=float(probs[cls]), logits=logits.tolist(),
                         probabilities=probs.tolist())


def request_to_item(request: pb.CheckRequest, bundle: ModelBundle,
                    limits: InputLimits) -> CheckItem:
    """Return the engine item for a CheckRequest, decoding and validating its image. Errors
    name fields of the CheckRequest; inside a CheckBatch the data plane prefixes them
    (batch_field)."""
    return CheckItem(
        image=image_from_proto(request.image, bundle, limits),
        methods=method_names(list(request.methods), "methods"),
        ax_processes=process_names(list(request.ax_processes), "ax_processes"),
        label=request.label if request.HasField("label") else None,
        return_heatmaps=request.return_heatmaps,
        prediction_only=request.prediction_only,
        verdict_only=request.verdict_only,
        image_checked=True,  # image_from_proto validated shape, values and range
    )


def item_to_request(item: CheckItem, request_id: str = "") -> pb.CheckRequest:
    """Return a CheckRequest carrying the item's image as a tensor (inverse of request_to_item)."""
    request = pb.CheckRequest(
        request_id=request_id,
        image=pb.Image(tensor=tensor_to_proto(item.image)),
        methods=[method_value(m) for m in item.methods],
        ax_processes=[AX_PROCESS_VALUE[p] for p in item.ax_processes],
        return_heatmaps=item.return_heatmaps,
        prediction_only=item.prediction_only,
        verdict_only=item.verdict_only,
    )
    if item.label is not None:
        request.label = item.label
    return request


def result_to_response(
    result: CheckResult, request_id: str, *, decode_ms: float = 0.0, total_ms: float = 0.0
) -> pb.CheckResponse:
    """Return the CheckResponse for an engine result."""
    scores = []
    for s in result.scores:
        score = pb.CoScore(method=method_value(s.method), ax_process=AX_PROCESS_VALUE[s.ax_process],
                           score=s.score, zero_heatmap=s.zero_heatmap)
        if s.labelled_score is not None:
            score.labelled_score = s.labelled_score
        scores.append(score)
    v = result.verdict
    return pb.CheckResponse(
        request_id=request_id,
        prediction=pb.Prediction(
            class_index=result.class_index, class_name=result.class_name,
            probability=result.probability, logits=result.logits,
            probabilities=result.probabilities,
        ),
        co_scores=scores,
        verdict=pb.Verdict(calibrated=v.calibrated, likely_wrong=v.likely_wrong, risk=v.risk,
                           threshold=v.threshold, calibration_id=v.calibration_id,
                           features=v.features),
        heatmaps={name: tensor_to_proto(h) for name, h in result.heatmaps.items()},
        timing=pb.Timing(
            decode_ms=decode_ms, forward_ms=result.timing.forward_ms,
            attribution_ms=result.timing.attribution_ms, ax_ms=result.timing.ax_ms,
            total_ms=total_ms, queue_ms=result.timing.queue_ms,
            batch_size=result.timing.batch_size,
        ),
    )


def response_to_result(response: pb.CheckResponse) -> CheckResult:
    """Return the engine result a CheckResponse carries (inverse of result_to_response)."""
    p = response.prediction
    v = response.verdict
    return CheckResult(
        class_index=p.class_index,
        class_name=p.class_name,
        probability=p.probability,
        logits=list(p.logits),
        probabilities=list(p.probabilities),
        scores=[
            MethodScore(
                method=method_name(s.method),
                ax_process=AX_PROCESS_BY_VALUE[s.ax_process],
                score=s.score,
                labelled_score=s.labelled_score if s.HasField("labelled_score") else None,
                zero_heatmap=s.zero_heatmap,
            )
            for s in response.co_scores
        ],
        heatmaps={name: tensor_from_proto(t) for name, t in response.heatmaps.items()},
        verdict=Verdict(v.calibrated, v.likely_wrong, v.risk, v.threshold, v.calibration_id,
                        dict(v.features)),
        timing=StageTiming(response.timing.forward_ms, response.timing.attribution_ms,
                           response.timing.ax_ms, response.timing.queue_ms,
                           response.timing.batch_size),
    )


def calibration_summary(artifact: CalibrationArtifact) -> pb.CalibrationSummary:
    """Return the CalibrationSummary of an artifact."""
    t = artifact.threshold
    return pb.CalibrationSummary(
        calibration_id=artifact.calibration_id, created_at=artifact.created_at, mode=t.mode,
        target=t.target, delta=t.delta, threshold=t.value,
        achieved_false_alarm_rate=t.achieved_false_alarm_rate,
        achieved_error_recall=t.achieved_error_recall,
        auroc_risk=artifact.metric("risk", "out_of_fold").auroc.value,
        auroc_msp=artifact.metric("msp", "out_of_fold").auroc.value,
        n_images=artifact.data.n_images, n_errors=artifact.data.n_errors,
        risk_features=artifact.flag.risk_model.features, gax_target=artifact.gax_target,
        families=[f.key for f in artifact.flag.families],
        data_source=artifact.data.source,
    )


STATE_VALUES = {"exact": pb.METHOD_STATE_EXACT, "reduced": pb.METHOD_STATE_REDUCED,
                "unavailable": pb.METHOD_STATE_UNAVAILABLE}


def method_status_message(status: attribution.MethodStatus) -> pb.MethodStatus:
    return pb.MethodStatus(
        method=method_value(status.method), state=STATE_VALUES[status.state],
        reduced_to=method_value(status.reduced_to) if status.reduced_to else 0,
        reason=status.reason)


def model_info(bundle: ModelBundle, default_methods: tuple[str, ...],
               calibration: CalibrationArtifact | None,
               report: list[attribution.MethodStatus]) -> pb.ModelInfo:
    """Return the ModelInfo message of a bundle, its calibration and its method report
    (Engine.method_report: the probed one)."""
    return pb.ModelInfo(
        method_statuses=[method_status_message(s) for s in report],
        model_format=bundle.model_format,
        calibration=calibration_summary(calibration) if calibration is not None else None,
        name=bundle.name,
        version=bundle.version,
        fingerprint=bundle.fingerprint,
        class_names=bundle.class_names,
        input_shape=list(bundle.spec.shape),
        mean=list(bundle.spec.mean),
        std=list(bundle.spec.std),
        available_methods=[method_value(s.method) for s in report if s.state != "unavailable"],
        default_methods=[method_value(m) for m in default_methods],
        torchscript=bundle.torchscript,
        device=str(bundle.device),
    )


def item_error(request_id: str, error: AxguardError) -> pb.CheckResponse:
    """Return a CheckBatch entry for an item that failed: its status code and message."""
    return pb.CheckResponse(request_id=request_id, error=pb.ItemError(
        code=status_for(error).value[0], message=error.message))


def answer_to_response(answer: Answer, answers: Answers) -> pb.CheckResponse:
    """Return the CheckResponse of one answered item (an ItemError when it failed)."""
    if answer.error is not None:
        return item_error(answer.request_id, answer.error)
    assert answer.result is not None
    response = result_to_response(answer.result, answer.request_id,
                                  decode_ms=answers.decode_ms, total_ms=answers.total_ms)
    response.receipt = answer.receipt
    return response


def batch_field(index: int, field: str | None) -> str:
    """The name of item `index`'s field inside a CheckBatchRequest."""
    return field_within(f"requests[{index}]", field)


def feedback_response(outcomes: list[LabelOutcome]) -> pb.FeedbackResponse:
    """Return the FeedbackResponse for the data plane's per-item outcomes."""
    response = pb.FeedbackResponse()
    for o in outcomes:
        result = response.results.add(counted=o.counted, duplicate=o.duplicate,
                                      request_id=o.request_id,
                                      prediction_correct=o.prediction_correct,
                                      flagged=o.flagged)
        if o.error is not None:
            result.error.code = status_for(o.error).value[0]
            result.error.message = o.error.message
    response.counted = sum(o.counted for o in outcomes)
    response.duplicates = sum(o.duplicate for o in outcomes)
    response.errors = sum(o.error is not None for o in outcomes)
    return response


def diagnose_ask(request: pb.DiagnoseRequest) -> DiagnoseAsk:
    """Return what a DiagnoseRequest asks (unset optional fields → None, the defaults)."""

    def optional(name: str) -> float | None:
        return getattr(request, name) if request.HasField(name) else None

    return DiagnoseAsk(target_class=optional("target_class"), target_co=optional("target_co"),
                       max_steps=request.max_steps or None,
                       learning_rate=optional("learning_rate"),
                       similarity_weight=optional("similarity_weight"),
                       snapshot_every=request.snapshot_every)


def diagnose_event_message(event: DiagnoseEvent, class_names: list[str]) -> pb.DiagnoseEvent:
    """Return the stream message of one diagnosis event."""
    step = event.step
    if event.kind == "progress":
        return pb.DiagnoseEvent(progress=pb.DiagnoseProgress(
            step=step.step, co_score=step.co_score, loss=step.loss, similarity=step.similarity))
    if event.kind == "snapshot":
        return pb.DiagnoseEvent(snapshot=pb.DiagnoseSnapshot(
            step=step.step, co_score=step.co_score, heatmap=tensor_to_proto(step.heatmap)))
    assert event.options is not None and event.image is not None
    return pb.DiagnoseEvent(result=pb.DiagnoseResult(
        reached_target=step.reached_target, steps=step.step, final_co=step.co_score,
        seconds=step.seconds, heatmap=tensor_to_proto(step.heatmap),
        prediction_before=prediction_message(event.logits_before, class_names),
        prediction_after=prediction_message(event.logits_after, class_names),
        target_class=event.options.target_class, target_co=event.options.target_co,
        image=tensor_to_proto(event.image)))


def model_info_message(described: ModelDescription) -> pb.ModelInfo:
    """Return ModelInfo for the data plane's description of the served model."""
    info = model_info(described.bundle, described.default_methods, described.calibration,
                      list(described.method_report))
    info.torch_threads = described.thread_choice.threads
    info.torch_threads_choice = described.thread_choice.describe()
    info.max_batch_items = described.max_batch_items
    info.max_message_bytes = described.max_message_bytes
    feedback = described.feedback
    info.feedback.CopyFrom(pb.FeedbackInfo(
        enabled=feedback.enabled, max_items=feedback.max_items,
        max_age_seconds=feedback.max_age_seconds, signing_key_id=feedback.signing_key_id))
    return info
