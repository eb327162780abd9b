"""Station configuration: one YAML file per station, validated before anything starts.

Every field has a description and bounds, unknown keys are errors (a typo must not silently
fall back to a default on a production line), and each source kind has a `type` tag.
Errors name the field path and the YAML line, e.g.

    station.yaml:12: source.stall_timeout_s: Input should be greater than 0

Relative paths are resolved against the config file's folder, so a station folder can be
moved as a whole. Secrets never live in the YAML: the MQTT password comes from a file,
an environment variable or systemd's `LoadCredential=mqtt-password`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge import DECODER_MAX_PIXELS
from edge.ui.settings import UiConfig
from edge.yaml_guard import YamlShapeError, check_yaml_shape

TOPIC_SAFE = r"^[A-Za-z0-9_.-]+$"  # no '/', '+', '#' or spaces: these end up inside MQTT topics
CREDENTIAL_NAME = "mqtt-password"


class ConfigError(ValueError):
    """A config (station YAML here, training's in training.core.train_config) cannot be used; `errors`
    holds one line per problem, each naming the file and the field."""

    def __init__(self, errors: str | list[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_backoff(minimum: float, maximum: float) -> None:
    """Reconnect backoff doubles from the minimum up to the maximum: the other way round is a typo."""
    if maximum < minimum:
        raise ValueError("reconnect_max_s must be >= reconnect_min_s")


class StationConfig(_Model):
    line: str = Field(min_length=1, max_length=64, pattern=TOPIC_SAFE,
                      description="Production line id; part of every MQTT topic and event.")
    name: str = Field(min_length=1, max_length=64, pattern=TOPIC_SAFE,
                      description="Station id, unique on the line; part of every MQTT topic and event.")


class _CaptureConfig(_Model):
    """Settings shared by OpenCV captures (live cameras and video files)."""

    stall_timeout_s: float = Field(default=5.0, gt=0, le=3600,
                                   description="No frame for this long -> `error` verdict + camera_lost alarm, repeated while it lasts.")
    open_timeout_s: float = Field(default=10.0, gt=0, le=600, description="OpenCV open timeout (FFmpeg/GStreamer backends).")
    read_timeout_s: float = Field(default=5.0, gt=0, le=600, description="OpenCV read timeout (FFmpeg/GStreamer backends).")
    reconnect_min_s: float = Field(default=0.5, gt=0, le=600, description="First reconnect delay; doubles after each failure.")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600, description="Upper bound of the reconnect delay.")

    @model_validator(mode="after")
    def _backoff_order(self) -> _CaptureConfig:
        _check_backoff(self.reconnect_min_s, self.reconnect_max_s)
        return self


class CameraSourceConfig(_CaptureConfig):
    type: Literal["camera"] = Field(description="Live camera through OpenCV VideoCapture.")
    uri: int | str = Field(description="Device index (0), device path (/dev/video0), rtsp:// or http:// URL, "
                                       "or a GStreamer pipeline ending in appsink.")
    backend: Literal["any", "ffmpeg", "gstreamer", "v4l2"] = Field(default="any", description="OpenCV capture backend.")
    width: int | None = Field(default=None, ge=8, le=20000, description="Requested frame width (camera may ignore it).")
    height: int | None = Field(default=None, ge=8, le=20000, description="Requested frame height (camera may ignore it).")
    fps: float | None = Field(default=None, gt=0, le=1000, description="Requested camera frame rate.")


class VideoSourceConfig(_CaptureConfig):
    type: Literal["video"] = Field(description="Video file through OpenCV (demos, benchmarks, replays).")
    path: Path = Field(description="Video file.")
    loop: bool = Field(default=False, description="Start again at the end (demos, soak tests).")
    stop_at_end: bool = Field(default=False, description="Stop the daemon when a non-looping video ends (benchmarks). "
                                                 "Otherwise the end of the video is treated like a lost camera.")
    realtime: bool = Field(default=False, description="Pace frames at the file's frame rate instead of as fast as possible.")


class FolderSourceConfig(_Model):
    type: Literal["folder"] = Field(description="Hot folder: one image file = one part, part id = file stem.")
    path: Path = Field(description="Folder watched for image files (top level only).")
    done_dir: Path | None = Field(default=None, description="Where inspected files go (default: <path>/done).")
    failed_dir: Path | None = Field(default=None, description="Where files with an `error` verdict go (default: <path>/failed).")
    settle_s: float = Field(default=1.0, ge=0, le=3600, description="A file is taken only when unmodified for this long "
                                                            "and its size is unchanged across two polls.")
    poll_interval_s: float = Field(default=0.5, gt=0, le=60, description="How often the folder is listed.")
    extensions: list[str] = Field(default=[".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"], min_length=1,
                                  description="File name endings picked up (case-insensitive); dotfiles, *.tmp and *.part never are.")
    order: Literal["name", "mtime"] = Field(default="name", description="Processing order of ready files.")
    stop_when_empty: bool = Field(default=False, description="Stop the daemon once the folder is empty (batch runs).")
    max_pixels: int = Field(default=DECODER_MAX_PIXELS, ge=64, le=1_000_000_000,
                            description="Files whose header announces more pixels (width x height) get an `error` "
                                        "verdict without being decoded: a tiny compressed file can decode to GBs. "
                                        "Formats whose header is not read are held by OpenCV's own limit, the "
                                        "environment variable OPENCV_IO_MAX_IMAGE_PIXELS (default 40000000): "
                                        "raise it too when raising this.")
    memory_reserve_mb: float = Field(default=128.0, ge=0, le=1_000_000,
                                     description="A file is not decoded (`error` verdict) when inspecting it would "
                                                 "leave less than this free under the service's cgroup memory limit "
                                                 "(systemd MemoryMax); no limit, no check.")
    quarantine_after_crashes: int = Field(default=3, ge=1, le=100,
                                          description="A file that was being inspected during this many daemon "
                                                      "crashes in a row goes to failed/ with an `error` verdict "
                                                      "instead of being inspected again (state_dir/folder-crashes.json).")


SYNTHETIC_POOL_MAX_BYTES = 2 * 2**30  # a benchmark's pool must not take the line PC's memory


class SyntheticSourceConfig(_Model):
    type: Literal["synthetic"] = Field(description="Generated parts with known truth: part ids start with "
                                                   "'ok-' (good) or 'ng-' (one dark defect).")
    width: int = Field(default=128, ge=16, le=8192, description="Frame width in pixels.")
    height: int = Field(default=96, ge=16, le=8192, description="Frame height in pixels.")
    fps: float = Field(default=10.0, ge=0, le=1000, description="Generation rate (0 = as fast as the pipeline takes them).")
    count: int = Field(default=0, ge=0, description="Parts to generate before the source ends (0 = endless).")
    defect_rate: float = Field(default=0.3, ge=0, le=1, description="Share of defective parts.")
    seed: int = Field(default=0, ge=0, description="Random seed (the same seed gives the same parts).")
    stop_at_end: bool = Field(default=True, description="Stop the daemon after `count` parts.")
    pool: int = Field(default=0, ge=0, le=256, description="0 = generate every part; N = cycle copies of N generated "
                      "good and N defective parts (benchmarks at camera sizes, where generating costs more than inspecting).")

    @model_validator(mode="after")
    def _pool_fits(self) -> SyntheticSourceConfig:
        held = 2 * self.pool * self.width * self.height  # uint8 grey frames, good and defective
        if held > SYNTHETIC_POOL_MAX_BYTES:
            raise ValueError(f"pool {self.pool} of {self.width}x{self.height} frames holds {held / 2**30:.1f} GiB "
                             f"(2 x pool frames); at most {SYNTHETIC_POOL_MAX_BYTES // 2**30} GiB: lower pool or the size")
        return self


SourceConfig = Annotated[
    CameraSourceConfig | VideoSourceConfig | FolderSourceConfig | SyntheticSourceConfig,
    Field(discriminator="type"),
]


class ModelConfig(_Model):
    path: Path = Field(description="Model package folder (model.xml/.bin + package.json from 'training export').")
    file: str = Field(default="model.xml", min_length=1, description="IR inside the package, e.g. fp32/model.xml.")
    device: str = Field(default="CPU", min_length=1, description="OpenVINO device.")
    num_requests: int = Field(default=0, ge=0, le=64, description="Parallel infer requests (0 = OpenVINO's optimum).")
    threads: int = Field(default=0, ge=0, le=256, description="Inference threads (0 = OpenVINO default).")
    hint: Literal["THROUGHPUT", "LATENCY"] = Field(default="THROUGHPUT", description="OpenVINO performance hint.")
    verify_hashes: bool = Field(default=True, description="Check the SHA-256 of every package file at load.")
    cpu_check: bool = Field(default=True, description="Run the package's check tiles (cpu_check.npz) at load: a model "
                            "this CPU computes differently from the export is replaced by the package's FP32 IR, or "
                            "refused (edge.cpu_check).")
    public_key: Path | None = Field(default=None, description="Ed25519 public key (PEM). When set, a package loads "
                                    "only with a valid package.json.sig made by the matching private key "
                                    "(`python -m training export --sign KEY`); needs verify_hashes.")
    shadow: Path | None = Field(default=None, description="A second package judged beside the live one (edge.lifecycle.shadow): "
                                "only the live model decides; disagreements go to <base>/shadow and "
                                "<state_dir>/shadow; `python -m edge promote` without --package makes it live. "
                                "Loaded at start (a change needs a restart).")
    shadow_every_nth: int = Field(default=1, ge=1, le=100_000, description="Offer every Nth part to the shadow.")
    shadow_cpu_share: float = Field(default=0.5, gt=0, le=1, description="Most of one core the shadow may keep busy "
                                    "(duty cycle); parts it has no room for are skipped and counted as thinned, "
                                    "the line is never slowed.")

    @model_validator(mode="after")
    def _signed_needs_hashes(self) -> ModelConfig:
        if self.public_key is not None and not self.verify_hashes:
            raise ValueError("verify_hashes: false would let files change under a signed package.json; "
                             "keep it true when public_key is set")
        return self


class RulesConfig(_Model):
    """Every unset value comes from the model package (calibrated in training)."""

    pixel_threshold: float | None = Field(default=None, gt=0, lt=1, description="Defect probability threshold per pixel.")
    min_area: int | None = Field(default=None, ge=0, le=10_000_000, description="Smaller regions (pixels) are ignored.")
    part_threshold: float | None = Field(default=None, gt=0, lt=1, description="Part score threshold of the verdict "
                                         "(models with a part output: fail iff part score >= this).")
    open_radius: int | None = Field(default=None, ge=0, le=50, description="Morphological opening radius (drops specks).")
    close_radius: int | None = Field(default=None, ge=0, le=50, description="Morphological closing radius (joins fragments).")
    max_defects: int | None = Field(default=None, ge=0, le=10_000, description="More defect regions than this -> fail (default 0).")
    max_total_area: int | None = Field(default=None, ge=0, description="Total defect area above this (pixels) -> fail.")
    max_region_area_mm2: float | None = Field(default=None, gt=0, description="Any region larger than this (mm2) -> fail.")
    mm_per_pixel: float | None = Field(default=None, gt=0, le=1000, description="Scale; needed by max_region_area_mm2.")

    @model_validator(mode="after")
    def _mm_rule_needs_scale(self) -> RulesConfig:
        if self.max_region_area_mm2 is not None and self.mm_per_pixel is None:
            raise ValueError("max_region_area_mm2 needs mm_per_pixel")
        return self


class RoiConfig(_Model):
    x: int = Field(ge=0, description="Left edge of the inspected region (pixels).")
    y: int = Field(ge=0, description="Top edge of the inspected region (pixels).")
    w: int = Field(ge=8, description="Width of the inspected region (pixels).")
    h: int = Field(ge=8, description="Height of the inspected region (pixels).")

    def crop(self, image: Any) -> Any:
        """The inspected region of a frame (a view, no copy): the one ROI rule of the line, its
        self-test and its shadow. ValueError when the region does not fit the frame."""
        if self.x + self.w > image.shape[1] or self.y + self.h > image.shape[0]:
            raise ValueError(f"roi {self.x},{self.y} {self.w}x{self.h} is outside the "
                             f"{image.shape[1]}x{image.shape[0]} frame")
        return image[self.y : self.y + self.h, self.x : self.x + self.w]


class FrameChecksConfig(_Model):
    reject_black: bool = Field(default=True, description="A uniform black frame (lens cap, dead light) -> `error`, never a pass.")
    black_mean_below: float = Field(default=4.0, ge=0, le=255, description="Mean grey level under which a frame counts as black...")
    black_std_below: float = Field(default=2.0, ge=0, le=255, description="...when its standard deviation is also below this.")
    reject_white: bool = Field(default=True, description="A uniform white frame (flash misfire, exposure far too long: "
                               "a blown-out sensor shows no part) -> `error`, never a pass.")
    white_mean_above: float = Field(default=251.0, ge=0, le=255, description="Mean grey level over which a frame counts as "
                                    "white...")
    white_std_below: float = Field(default=2.0, ge=0, le=255, description="...when its standard deviation is also below this.")
    expect_width: int | None = Field(default=None, ge=8, le=20000, description="Frames of another width -> `error`.")
    expect_height: int | None = Field(default=None, ge=8, le=20000, description="Frames of another height -> `error`.")
    max_age_s: float = Field(default=2.0, ge=0, le=3600, description="Live frames older than this at inference -> `error` "
                                                             "(stale). 0 = off. Not applied to folder files.")


class PipelineConfig(_Model):
    mode: Literal["free_run", "triggered"] = Field(default="free_run", description="free_run: inspect frames as they come; "
                                                   "triggered: a message on <base>/trigger names the part of the next frame.")
    every_nth: int = Field(default=1, ge=1, le=10_000, description="free_run: inspect every Nth frame.")
    max_fps: float = Field(default=0.0, ge=0, le=1000, description="free_run: at most this many inspections per second (0 = no limit).")
    event_max_regions: int = Field(default=50, ge=0, le=500, description="Regions listed in a result event (the largest "
                                   "first); region_count and regions_truncated say how many there were. Keeps every "
                                   "event far below the broker's message size limit.")
    opencv_threads: int = Field(default=1, ge=0, le=256, description="OpenCV's worker threads in the daemon (0 = "
                                "OpenCV's default, one per core). 1: the cores belong to OpenVINO; OpenCV's pool woke "
                                "for every small labelling and resize and cost ~20 % of a part's CPU at full speed.")
    queue_size: int = Field(default=8, ge=1, le=1000, description="Frames waiting for inference; live frames beyond it are "
                                                          "dropped and counted, parts (folder, trigger) wait instead.")
    max_queued_mb: float = Field(default=32.0, ge=8, le=65536, description="Memory the parts inside the frame path "
                                 "may hold (frames + float32 probability maps at the model's output resolution, "
                                 "waiting, in inference or for storage: ~6.3 MB per 5 MP part at scale 0.25 or output "
                                 "stride 4, ~0.5 MB at 768x576); when reached, live frames are dropped and counted, "
                                 "parts wait. 32 MB holds 5 parts at 5 MP (enough to keep inference busy) and "
                                 "pipeline.queue_size + 64 at 768x576.")
    hang_timeout_s: float | None = Field(default=None, gt=0, le=3600, description="No result for this long while parts "
                                         "wait, and no deliberate hold (full outbox/disk), or a capture read/decode "
                                         "stuck this long: stop feeding the systemd watchdog so the daemon is restarted "
                                         "(default max(60, 3 x stall_timeout_s, 2 x (open_timeout_s + read_timeout_s))).")
    trigger_timeout_s: float = Field(default=5.0, gt=0, le=3600, description="A trigger with no frame within this -> `error` verdict.")
    trigger_max_pending: int = Field(default=64, ge=1, le=10_000, description="Triggers waiting for a frame; overflow -> `error` verdict.")
    # Trigger integrity (issue 14): each trigger gets exactly one result, never another part's frame.
    trigger_dedup_s: float = Field(default=300.0, ge=0, le=86_400,
                                   description="A trigger for a part id that is still open, or whose trigger or result "
                                               "is younger than this, is a duplicate: acknowledged and counted, but no "
                                               "second frame and no second result. Longer than a reconnect plus a "
                                               "restart (redeliveries), shorter than a part's way back to the station.")
    trigger_max_age_s: float = Field(default=2.0, ge=0, le=3600,
                                     description="A trigger whose PLC time stamp (`ts` in the payload) differs from the "
                                                 "station clock by more than this arrived too late (queued by the "
                                                 "broker during an outage): its part has passed the camera, so it gets "
                                                 "an `error` verdict instead of a later part's frame. 0 = no check.")
    trigger_frame_delay_s: float = Field(default=0.0, ge=0, le=10,
                                         description="Frames grabbed less than this after a trigger are not used for it: "
                                                     "set it to the camera's stream latency (a network camera hands a "
                                                     "frame over some 0.1-0.5 s after its exposure).")
    drain_timeout_s: float = Field(default=10.0, ge=0, le=600, description="On stop, time allowed to finish frames in flight "
                                                                   "and to send the outbox backlog.")


class MqttConfig(_Model):
    host: str = Field(default="localhost", min_length=1, description="Broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    topic_prefix: str = Field(default="inspection", min_length=1, max_length=128, pattern=r"^[^#+\s]+$",
                              description="Topics are <topic_prefix>/<line>/<station>/{result,status,alarm,stats,trigger}.")
    client_id: str | None = Field(default=None, max_length=128, description="MQTT client id (default edge-<line>-<station>).")
    username: str | None = Field(default=None, description="Broker user name.")
    password_file: Path | None = Field(default=None, description="File holding the broker password (first line).")
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="Environment variable holding the broker password.")
    password: Any = Field(default=None, description="Not allowed: see password_file, password_env, LoadCredential.")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    keepalive: int = Field(default=30, ge=5, le=3600, description="Keepalive (s); the broker sends the Last Will after 1.5x.")
    tls_ca: Path | None = Field(default=None, description="CA bundle; enables TLS.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    tls_key: Path | None = Field(default=None, description="Client key (mutual TLS).")
    tls_insecure: bool = Field(default=False, description="Skip the broker host name check (test benches only).")
    max_inflight: int = Field(default=20, ge=1, le=65535, description="QoS 1 messages awaiting acknowledgement.")
    reconnect_min_s: float = Field(default=1.0, gt=0, le=600, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600, description="Upper bound of the reconnect delay.")
    # -- delivery promise (issue 14, broker side) --
    no_subscribers: Literal["retry", "deliver"] = Field(
        default="retry", description="MQTT 5 PUBACK 0x10 (no matching subscribers: the broker dropped the result). "
        "retry: keep it in the outbox, retry with backoff, raise `no_subscribers` (nothing lost: with the shipped "
        "broker config consumers hold persistent sessions, so 0x10 means no consumer session exists at all); "
        "deliver: count it as delivered (benches without consumers).")
    replay_acked_s: float = Field(default=2.0, ge=0, le=60,
                                  description="After a lost connection, results the broker acknowledged in the last N "
                                              "seconds go back into the outbox and are sent again with their event_id: "
                                              "Mosquitto acknowledges before it saves, so a broker killed in between "
                                              "would lose them. Consumers may see such a result twice and dedupe by "
                                              "event_id (the promise is at-least-once). 0 = off.")
    session_expiry_s: int = Field(default=3600, ge=0, le=4_294_967_295,
                                  description="Persistent MQTT session: the broker keeps the station's subscription and "
                                              "queues QoS 1 triggers for this long while it is away (MQTT 5 session "
                                              "expiry; 3.1.1 keeps the session until the broker expires it). "
                                              "0 = clean session: triggers sent while the station reconnects are lost.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @field_validator("password")
    @classmethod
    def _no_password(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("a password must not be written in the config; use mqtt.password_file, "
                             f"mqtt.password_env or systemd LoadCredential={CREDENTIAL_NAME}:<file>")
        return None

    @model_validator(mode="after")
    def _one_secret(self) -> MqttConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set only one of password_file and password_env")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        _check_backoff(self.reconnect_min_s, self.reconnect_max_s)
        return self


class OutboxConfig(_Model):
    path: Path | None = Field(default=None, description="SQLite outbox file (default <state_dir>/outbox.sqlite3).")
    max_events: int = Field(default=100_000, ge=100, le=100_000_000, description="Unsent events kept; full -> alarm, and the "
                                                                         "pipeline stops taking parts rather than lose one.")
    group_commit_max: int = Field(default=64, ge=1, le=10_000, description="At most this many results share one outbox "
                                  "transaction (one fsync); 1 = one transaction per result.")
    group_commit_ms: float = Field(default=2.0, ge=0, le=1000, description="While more parts are in flight, wait up "
                                   "to this long for them to join a group; parts are committed only once it is durable.")


class EvidenceConfig(_Model):
    enabled: bool = Field(default=True, description="Save images of inspected parts.")
    dir: Path | None = Field(default=None, description="Evidence folder (default <state_dir>/evidence).")
    quota_mb: float = Field(default=1024.0, gt=0, description="Disk quota; the oldest evidence is deleted first.")
    save_fail: bool = Field(default=True, description="Save frame, overlay and mask of failed parts.")
    save_error: bool = Field(default=True, description="Save the frame of `error` parts when there is one.")
    pass_sample_every: int = Field(default=0, ge=0, description="Save every Nth passed part (0 = none).")
    format: Literal["png", "jpg"] = Field(default="png", description="Image format of saved frames and overlays (masks are PNG).")
    overlay_max_side: int = Field(default=1280, ge=0, le=65536, description="The overlay (what a person looks at) is "
                                  "shrunk to at most this many pixels on its long side; frame and mask keep every "
                                  "pixel. At 5 MP this spares a 15 MB colour copy per fail and most of its PNG's "
                                  "CPU. 0 = full size.")
    queue_mb: float = Field(default=16.0, gt=0, le=65536, description="Frames and masks (the box of their set pixels) "
                            "waiting for the background evidence writer, in MB (3 fails at 5 MP, ~36 at 768x576); "
                            "the verdict path never waits for it (see keep_every_when_behind).")
    keep_every_when_behind: int = Field(default=10, ge=1, le=100_000, description="Once the writer's queue is over half "
                                        "full, keep the evidence of every Nth part only (thinning is counted and alarmed).")
    keep_first_bad: int = Field(default=3, ge=0, le=1000, description="...but always keep the first N fails/errors after a "
                                "pass while they fit the queue: the frames wanted when a line turns bad (within the "
                                "CPU budget: its burst, refilled while parts pass, keeps them on a saturated line).")
    thinning_alarm_s: float = Field(default=10.0, ge=0, le=86400, description="Thinning that lasts this long raises the "
                                    "evidence_thinned alarm; it clears after as long without thinning.")
    cpu_share: float | None = Field(default=0.05, gt=0, le=1024, description="While the machine's CPUs are saturated, "
                                    "or parts wait for the model, the writer may use this share of one core on average (after a "
                                    "1 s burst); beyond it all evidence is thinned until the budget refills. Idle cores "
                                    "encode everything. null = no CPU budget (only the queue bound thins).")


class AlarmsConfig(_Model):
    consecutive_fails: int = Field(default=5, ge=1, le=100_000, description="This many fails in a row -> alarm.")
    fail_rate_window: int = Field(default=50, ge=1, le=100_000, description="Parts in the fail-rate window.")
    fail_rate_max: float = Field(default=0.3, gt=0, le=1, description="Fail share over the window above this -> alarm.")
    backlog_ratio: float = Field(default=0.5, gt=0, le=1, description="Outbox fill above this share of max_events -> alarm.")


class SelfTestConfig(_Model):
    """Golden-sample self-test (edge.lifecycle.selftest); the set lives in <state_dir>/golden (`python -m edge golden`)."""

    interval_s: float = Field(default=0.0, ge=0, le=7 * 86400, description="Run the golden set between parts every "
                              "this many seconds (0 = only at start, at every reload and on a command).")
    on_failure: Literal["stop", "alarm"] = Field(default="stop", description="A failed run between parts raises "
                                                 "selftest_failed and then: stop = every part gets an `error` "
                                                 "verdict until a self-test passes again; alarm = keep inspecting.")
    commands: bool = Field(default=True, description="Run on {\"command\": \"selftest\"} published to <base>/command.")
    min_samples: int = Field(default=0, ge=0, le=10_000, description="Fewer golden samples than this fail the "
                             "self-test (0 = an empty set passes, untested).")


class MetricsConfig(_Model):
    enabled: bool = Field(default=True, description="Serve /metrics (Prometheus) and /healthz.")
    host: str = Field(default="127.0.0.1", description="Bind address; keep localhost unless a firewall is in place.")
    port: int = Field(default=9108, ge=0, le=65535, description="HTTP port (0 = any free port).")
    stats_interval_s: float = Field(default=30.0, gt=0, le=86400, description="Period of the stats message on <base>/stats.")


class LoggingConfig(_Model):
    format: Literal["text", "json"] = Field(default="text", description="json = one JSON object per line (journald, Loki).")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")


class OpcuaConfig(_Model):
    """The PLC handshake (issue 19, docs/opcua.md): an OPC UA server in the daemon, OPC 40100 style."""

    enabled: bool = Field(default=False, description="Serve the station's OPC UA handshake (needs the `opcua` "
                          "extra and pipeline.mode triggered).")
    endpoint: str = Field(default="opc.tcp://0.0.0.0:4840/edge/", pattern=r"^opc\.tcp://[^\s/]+:[0-9]+(/\S*)?$",
                          description="Listen URL, opc.tcp://HOST:PORT/PATH (0.0.0.0 = every interface).")
    namespace_uri: str = Field(default="urn:edge-inspection:station", min_length=1, max_length=256,
                               description="Namespace of the station's nodes (string node ids, docs/opcua.md).")
    security_policy: Literal["Basic256Sha256", "None"] = Field(
        default="Basic256Sha256", description="Basic256Sha256 with SignAndEncrypt; None (no signing, no "
        "encryption) only on an isolated test bench: logged as a warning at every start.")
    certificate: Path | None = Field(default=None, description="Server certificate (DER or PEM), from "
                                     "`python -m edge opcua-certs`; required unless security_policy is None.")
    private_key: Path | None = Field(default=None, description="Server private key (PEM) for `certificate`.")
    trusted_clients: Path | None = Field(default=None, description="Folder of trusted client certificates (*.der, "
                                         "*.pem): only a client whose certificate is in it may open a session "
                                         "(re-read at every new session). Required unless security_policy is None.")
    allow_anonymous: bool = Field(default=False, description="Accept the anonymous user identity (the secure "
                                  "channel's certificate must still be trusted). Off: the client signs in with its "
                                  "certificate as user identity.")
    max_jobs: int = Field(default=4, ge=1, le=1000, description="Jobs the station holds at once: started and not yet "
                          "acknowledged by the PLC. StartJob beyond it is refused with status Busy, never dropped.")

    @model_validator(mode="after")
    def _secure_needs_files(self) -> OpcuaConfig:
        if self.enabled and self.security_policy != "None":
            missing = [n for n in ("certificate", "private_key", "trusted_clients") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"security_policy {self.security_policy} needs {', '.join(missing)} (make them "
                                 f"with `python -m edge opcua-certs --out DIR`)")
        if self.enabled and self.security_policy == "None" and not self.allow_anonymous:
            raise ValueError("security_policy None checks no certificate, so every client is anonymous: "
                             "set allow_anonymous: true to mean it")
        return self


class Config(_Model):
    station: StationConfig = Field(description="Which station this daemon is.")
    source: SourceConfig = Field(description="Where frames come from.")
    model: ModelConfig = Field(description="Model package.")
    rules: RulesConfig = Field(default_factory=RulesConfig, description="Verdict limits (override the package).")
    roi: RoiConfig | None = Field(default=None, description="Crop of the frame that is inspected (default: whole frame).")
    frame_checks: FrameChecksConfig = Field(default_factory=FrameChecksConfig, description="Frames refused before inference.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Frame flow.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Durable event store.")
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig, description="Saved images.")
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig, description="Alarm thresholds.")
    selftest: SelfTestConfig = Field(default_factory=SelfTestConfig, description="Golden-sample self-test.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics, health and stats.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Daemon logs.")
    ui: UiConfig = Field(default_factory=UiConfig, description="The station page (`python -m edge ui`), not the daemon.")
    state_dir: Path = Field(description="Writable folder for the outbox, sequence numbers and evidence.")
    recipes: dict[Annotated[str, Field(pattern=TOPIC_SAFE, max_length=64)], RulesConfig] = Field(
        default_factory=dict, description="Named rule sets a trigger (OPC UA StartJob, or `recipe` in an MQTT "
        "trigger) selects; each overrides `rules` field by field.")
    opcua: OpcuaConfig = Field(default_factory=OpcuaConfig, description="OPC UA PLC handshake (docs/opcua.md).")

    @model_validator(mode="after")
    def _trigger_needs_stream(self) -> Config:
        if self.pipeline.mode == "triggered" and self.source.type == "folder":
            raise ValueError("pipeline.mode 'triggered' needs a camera, video or synthetic source "
                             "(a folder file already names its part)")
        if self.opcua.enabled and self.pipeline.mode != "triggered":
            raise ValueError("opcua.enabled needs pipeline.mode 'triggered' (a StartJob is a trigger)")
        return self

    @property
    def base_topic(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.station.line}/{self.station.name}"


def default_of(section: type[BaseModel], name: str) -> Any:
    """A field's default, for the parameters of runtime classes that tests and tools build without
    a config: the value itself lives only in its config section above."""
    return section.model_fields[name].default


# -- loading -------------------------------------------------------------------------------------

def _node_child(node: yaml.Node | None, key: Any) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                return v
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        return node.value[key]
    return None


def _locate(loc: tuple[Any, ...], data: Any, node: yaml.Node | None) -> tuple[str, int | None]:
    """Dotted field path (union tags left out) and the 1-based YAML line closest to it."""
    parts: list[str] = []
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(data, dict) and key not in data and data.get("type") == key:
            continue  # pydantic puts the discriminator value in the path: not a YAML key
        parts.append(f"[{key}]" if isinstance(key, int) else str(key))
        child = _node_child(node, key)
        if child is not None:
            node, line = child, child.start_mark.line + 1
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        else:
            data = None
    return ".".join(parts).replace(".[", "[") or "(top level)", line


def _duplicate_keys(node: yaml.Node | None, prefix: str = "") -> list[tuple[str, int]]:
    """YAML silently keeps the last of two equal keys; on a line PC that hides an edit."""
    found: list[tuple[str, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            name = f"{prefix}{k.value}"
            if k.value in seen:
                found.append((name, k.start_mark.line + 1))
            seen.add(k.value)
            found += _duplicate_keys(v, name + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found += _duplicate_keys(v, f"{prefix[:-1]}[{i}].")
    return found


def _resolve_paths(model: BaseModel, base: Path) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, base / value)
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)


def validate_config(data: Any, where: str = "<config>", node: yaml.Node | None = None,
                    base_dir: Path | None = None) -> Config:
    """Validate a parsed config; raise ConfigError listing every problem with its field."""
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: expected a mapping of sections (station, source, model, ...), "
                           f"got {type(data).__name__}"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors = []
        for err in e.errors(include_input=False, include_url=False):
            path, line = _locate(tuple(err["loc"]), data, node)
            at = f"{where}:{line}" if line else where
            errors.append(f"{at}: {path}: {err['msg']}")
        raise ConfigError(errors) from None
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file; relative paths are taken from the file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from None
    try:
        check_yaml_shape(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except YamlShapeError as e:
        raise ConfigError([e.at(p)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError([f"{at}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    dups = _duplicate_keys(node)
    if dups:
        raise ConfigError([f"{p}:{line}: {name}: key given twice" for name, line in dups])
    return validate_config(data, str(p), node, p.resolve().parent)


def load_config_or_report(path: str) -> Config | None:
    """For commands: the station config, or None after printing every problem to stderr (the caller
    exits 78, EX_CONFIG)."""
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{path}: invalid config:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def resolve_password(mqtt: MqttConfig) -> str | None:
    """The broker password from its file, variable or systemd credential; None when none is set up."""
    if mqtt.password_file is not None:
        try:
            return mqtt.password_file.read_text(encoding="utf-8").splitlines()[0].strip() or None
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ConfigError([f"mqtt.password_file: cannot read {mqtt.password_file}: {type(e).__name__}"]) from None
    if mqtt.password_env is not None:
        value = os.environ.get(mqtt.password_env)
        if value is None:
            raise ConfigError([f"mqtt.password_env: environment variable {mqtt.password_env} is not set"])
        return value
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_NAME).is_file():
        lines = (Path(cred_dir) / CREDENTIAL_NAME).read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else None
    return None
