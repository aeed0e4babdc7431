from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttributionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTRIBUTION_METHOD_UNSPECIFIED: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_SALIENCY: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_DECONVOLUTION: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_INPUT_X_GRADIENT: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_GUIDED_BACKPROP: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_DEEP_LIFT: _ClassVar[AttributionMethod]
    ATTRIBUTION_METHOD_LAYER_GRAD_CAM: _ClassVar[AttributionMethod]

class AxProcess(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AX_PROCESS_UNSPECIFIED: _ClassVar[AxProcess]
    AX_PROCESS_SUM: _ClassVar[AxProcess]
    AX_PROCESS_PRODUCT: _ClassVar[AxProcess]

class MethodState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_STATE_UNSPECIFIED: _ClassVar[MethodState]
    METHOD_STATE_EXACT: _ClassVar[MethodState]
    METHOD_STATE_REDUCED: _ClassVar[MethodState]
    METHOD_STATE_UNAVAILABLE: _ClassVar[MethodState]
ATTRIBUTION_METHOD_UNSPECIFIED: AttributionMethod
ATTRIBUTION_METHOD_SALIENCY: AttributionMethod
ATTRIBUTION_METHOD_DECONVOLUTION: AttributionMethod
ATTRIBUTION_METHOD_INPUT_X_GRADIENT: AttributionMethod
ATTRIBUTION_METHOD_GUIDED_BACKPROP: AttributionMethod
ATTRIBUTION_METHOD_DEEP_LIFT: AttributionMethod
ATTRIBUTION_METHOD_LAYER_GRAD_CAM: AttributionMethod
AX_PROCESS_UNSPECIFIED: AxProcess
AX_PROCESS_SUM: AxProcess
AX_PROCESS_PRODUCT: AxProcess
METHOD_STATE_UNSPECIFIED: MethodState
METHOD_STATE_EXACT: MethodState
METHOD_STATE_REDUCED: MethodState
METHOD_STATE_UNAVAILABLE: MethodState

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("request_id", "image", "methods", "ax_processes", "label", "return_heatmaps", "prediction_only", "verdict_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    AX_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RETURN_HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ONLY_FIELD_NUMBER: _ClassVar[int]
    VERDICT_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: Image
    methods: _containers.RepeatedScalarFieldContainer[AttributionMethod]
    ax_processes: _containers.RepeatedScalarFieldContainer[AxProcess]
    label: int
    return_heatmaps: bool
    prediction_only: bool
    verdict_only: bool
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[AttributionMethod, str]]] = ..., ax_processes: _Optional[_Iterable[_Union[AxProcess, str]]] = ..., label: _Optional[int] = ..., return_heatmaps: _Optional[bool] = ..., prediction_only: _Optional[bool] = ..., verdict_only: _Optional[bool] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_index", "class_name", "probability", "logits", "probabilities")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    class_name: str
    probability: float
    logits: _containers.RepeatedScalarFieldContainer[float]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., probability: _Optional[float] = ..., logits: _Optional[_Iterable[float]] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class CoScore(_message.Message):
    __slots__ = ("method", "ax_process", "score", "labelled_score", "zero_heatmap")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AX_PROCESS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABELLED_SCORE_FIELD_NUMBER: _ClassVar[int]
    ZERO_HEATMAP_FIELD_NUMBER: _ClassVar[int]
    method: AttributionMethod
    ax_process: AxProcess
    score: float
    labelled_score: float
    zero_heatmap: bool
    def __init__(self, method: _Optional[_Union[AttributionMethod, str]] = ..., ax_process: _Optional[_Union[AxProcess, str]] = ..., score: _Optional[float] = ..., labelled_score: _Optional[float] = ..., zero_heatmap: _Optional[bool] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("calibrated", "likely_wrong", "risk", "threshold", "calibration_id", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    LIKELY_WRONG_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    calibrated: bool
    likely_wrong: bool
    risk: float
    threshold: float
    calibration_id: str
    features: _containers.ScalarMap[str, float]
    def __init__(self, calibrated: _Optional[bool] = ..., likely_wrong: _Optional[bool] = ..., risk: _Optional[float] = ..., threshold: _Optional[float] = ..., calibration_id: _Optional[str] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "forward_ms", "attribution_ms", "ax_ms", "total_ms", "queue_ms", "batch_size")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_MS_FIELD_NUMBER: _ClassVar[int]
    AX_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    forward_ms: float
    attribution_ms: float
    ax_ms: float
    total_ms: float
    queue_ms: float
    batch_size: int
    def __init__(self, decode_ms: _Optional[float] = ..., forward_ms: _Optional[float] = ..., attribution_ms: _Optional[float] = ..., ax_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("request_id", "prediction", "co_scores", "verdict", "heatmaps", "timing", "error", "receipt")
    class HeatmapsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CO_SCORES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prediction: Prediction
    co_scores: _containers.RepeatedCompositeFieldContainer[CoScore]
    verdict: Verdict
    heatmaps: _containers.MessageMap[str, Tensor]
    timing: Timing
    error: ItemError
    receipt: str
    def __init__(self, request_id: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., co_scores: _Optional[_Iterable[_Union[CoScore, _Mapping]]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., heatmaps: _Optional[_Mapping[str, Tensor]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., receipt: _Optional[str] = ...) -> None: ...

class CheckBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[CheckRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[CheckRequest, _Mapping]]] = ...) -> None: ...

class CheckBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[CheckResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[CheckResponse, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CalibrationSummary(_message.Message):
    __slots__ = ("calibration_id", "created_at", "mode", "target", "delta", "threshold", "achieved_false_alarm_rate", "achieved_error_recall", "auroc_risk", "auroc_msp", "n_images", "n_errors", "risk_features", "gax_target", "data_source", "families")
    CALIBRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_FALSE_ALARM_RATE_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_ERROR_RECALL_FIELD_NUMBER: _ClassVar[int]
    AUROC_RISK_FIELD_NUMBER: _ClassVar[int]
    AUROC_MSP_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    N_ERRORS_FIELD_NUMBER: _ClassVar[int]
    RISK_FEATURES_FIELD_NUMBER: _ClassVar[int]
    GAX_TARGET_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    calibration_id: str
    created_at: str
    mode: str
    target: float
    delta: float
    threshold: float
    achieved_false_alarm_rate: float
    achieved_error_recall: float
    auroc_risk: float
    auroc_msp: float
    n_images: int
    n_errors: int
    risk_features: _containers.RepeatedScalarFieldContainer[str]
    gax_target: float
    data_source: str
    families: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, calibration_id: _Optional[str] = ..., created_at: _Optional[str] = ..., mode: _Optional[str] = ..., target: _Optional[float] = ..., delta: _Optional[float] = ..., threshold: _Optional[float] = ..., achieved_false_alarm_rate: _Optional[float] = ..., achieved_error_recall: _Optional[float] = ..., auroc_risk: _Optional[float] = ..., auroc_msp: _Optional[float] = ..., n_images: _Optional[int] = ..., n_errors: _Optional[int] = ..., risk_features: _Optional[_Iterable[str]] = ..., gax_target: _Optional[float] = ..., data_source: _Optional[str] = ..., families: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "fingerprint", "class_names", "input_shape", "mean", "std", "available_methods", "default_methods", "calibration", "torchscript", "device", "feedback", "torch_threads", "torch_threads_choice", "max_batch_items", "max_message_bytes", "method_statuses", "model_format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_METHODS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHODS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    TORCHSCRIPT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_CHOICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    METHOD_STATUSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    fingerprint: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    available_methods: _containers.RepeatedScalarFieldContainer[AttributionMethod]
    default_methods: _containers.RepeatedScalarFieldContainer[AttributionMethod]
    calibration: CalibrationSummary
    torchscript: bool
    device: str
    feedback: FeedbackInfo
    torch_threads: int
    torch_threads_choice: str
    max_batch_items: int
    max_message_bytes: int
    method_statuses: _containers.RepeatedCompositeFieldContainer[MethodStatus]
    model_format: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., available_methods: _Optional[_Iterable[_Union[AttributionMethod, str]]] = ..., default_methods: _Optional[_Iterable[_Union[AttributionMethod, str]]] = ..., calibration: _Optional[_Union[CalibrationSummary, _Mapping]] = ..., torchscript: _Optional[bool] = ..., device: _Optional[str] = ..., feedback: _Optional[_Union[FeedbackInfo, _Mapping]] = ..., torch_threads: _Optional[int] = ..., torch_threads_choice: _Optional[str] = ..., max_batch_items: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., method_statuses: _Optional[_Iterable[_Union[MethodStatus, _Mapping]]] = ..., model_format: _Optional[str] = ...) -> None: ...

class MethodStatus(_message.Message):
    __slots__ = ("method", "state", "reduced_to", "reason")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REDUCED_TO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    method: AttributionMethod
    state: MethodState
    reduced_to: AttributionMethod
    reason: str
    def __init__(self, method: _Optional[_Union[AttributionMethod, str]] = ..., state: _Optional[_Union[MethodState, str]] = ..., reduced_to: _Optional[_Union[AttributionMethod, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class FeedbackInfo(_message.Message):
    __slots__ = ("enabled", "signing_key_id", "max_age_seconds", "max_items")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    signing_key_id: str
    max_age_seconds: float
    max_items: int
    def __init__(self, enabled: _Optional[bool] = ..., signing_key_id: _Optional[str] = ..., max_age_seconds: _Optional[float] = ..., max_items: _Optional[int] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LabelFeedback]
    def __init__(self, items: _Optional[_Iterable[_Union[LabelFeedback, _Mapping]]] = ...) -> None: ...

class LabelFeedback(_message.Message):
    __slots__ = ("receipt", "label")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    receipt: str
    label: int
    def __init__(self, receipt: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class FeedbackResult(_message.Message):
    __slots__ = ("counted", "duplicate", "request_id", "prediction_correct", "flagged", "error")
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_CORRECT_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    counted: bool
    duplicate: bool
    request_id: str
    prediction_correct: bool
    flagged: bool
    error: ItemError
    def __init__(self, counted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., request_id: _Optional[str] = ..., prediction_correct: _Optional[bool] = ..., flagged: _Optional[bool] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("results", "counted", "duplicates", "errors")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FeedbackResult]
    counted: int
    duplicates: int
    errors: int
    def __init__(self, results: _Optional[_Iterable[_Union[FeedbackResult, _Mapping]]] = ..., counted: _Optional[int] = ..., duplicates: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...

class DiagnoseRequest(_message.Message):
    __slots__ = ("request_id", "image", "target_class", "target_co", "max_steps", "learning_rate", "similarity_weight", "snapshot_every")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_CO_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVERY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: Image
    target_class: int
    target_co: float
    max_steps: int
    learning_rate: float
    similarity_weight: float
    snapshot_every: int
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., target_class: _Optional[int] = ..., target_co: _Optional[float] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., similarity_weight: _Optional[float] = ..., snapshot_every: _Optional[int] = ...) -> None: ...

class DiagnoseProgress(_message.Message):
    __slots__ = ("step", "co_score", "loss", "similarity")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CO_SCORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    step: int
    co_score: float
    loss: float
    similarity: float
    def __init__(self, step: _Optional[int] = ..., co_score: _Optional[float] = ..., loss: _Optional[float] = ..., similarity: _Optional[float] = ...) -> None: ...

class DiagnoseSnapshot(_message.Message):
    __slots__ = ("step", "co_score", "heatmap")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CO_SCORE_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    step: int
    co_score: float
    heatmap: Tensor
    def __init__(self, step: _Optional[int] = ..., co_score: _Optional[float] = ..., heatmap: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DiagnoseResult(_message.Message):
    __slots__ = ("reached_target", "steps", "final_co", "seconds", "heatmap", "prediction_before", "prediction_after", "target_class", "target_co", "image")
    REACHED_TARGET_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_CO_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_AFTER_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_CO_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    reached_target: bool
    steps: int
    final_co: float
    seconds: float
    heatmap: Tensor
    prediction_before: Prediction
    prediction_after: Prediction
    target_class: int
    target_co: float
    image: Tensor
    def __init__(self, reached_target: _Optional[bool] = ..., steps: _Optional[int] = ..., final_co: _Optional[float] = ..., seconds: _Optional[float] = ..., heatmap: _Optional[_Union[Tensor, _Mapping]] = ..., prediction_before: _Optional[_Union[Prediction, _Mapping]] = ..., prediction_after: _Optional[_Union[Prediction, _Mapping]] = ..., target_class: _Optional[int] = ..., target_co: _Optional[float] = ..., image: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DiagnoseEvent(_message.Message):
    __slots__ = ("progress", "snapshot", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: DiagnoseProgress
    snapshot: DiagnoseSnapshot
    result: DiagnoseResult
    def __init__(self, progress: _Optional[_Union[DiagnoseProgress, _Mapping]] = ..., snapshot: _Optional[_Union[DiagnoseSnapshot, _Mapping]] = ..., result: _Optional[_Union[DiagnoseResult, _Mapping]] = ...) -> None: ...
