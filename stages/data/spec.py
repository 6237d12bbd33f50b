"""Specs and params of the data stage types (no torch import: validate/plan must stay fast)."""
from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlflow.stage import LocalFileParam, Params, StageSpec


def _check_splits(splits: dict[str, float]) -> dict[str, float]:
    """Splits are either fractions summing to 1 or whole-image counts (checked against num_images later)."""
    if not splits:
        raise ValueError("splits must name at least one split")
    if any(v < 0 for v in splits.values()):
        raise ValueError("split sizes must be >= 0")
    total = sum(splits.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6) and any(v != int(v) for v in splits.values()):
        raise ValueError(f"splits must be fractions summing to 1 or whole counts, got {splits} (sum {total})")
    return splits


class _SyntheticParams(Params):
    num_images: int = Field(200, ge=1, le=1_000_000)
    image_size: int = Field(128, ge=32, le=4096, description="image width in pixels")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    captions_per_image: int = Field(5, ge=1, le=20)
    caption_style: Literal["varied", "complete"] = Field(
        "varied", description="varied: template captions that often name only some shapes (or only the background); "
                              "complete: every caption names every shape with its colour and position")
    jpeg_quality: int = Field(90, ge=1, le=100)
    noise: float = Field(8.0, ge=0, le=128, description="std of pixel noise on 'noisy' images")
    noisy_fraction: float = Field(0.5, ge=0, le=1, description="share of images with a noisy background")
    vary_aspect: bool = Field(False, description="heights vary (3:4, 1:1, 4:3) like real photos")
    threads: int = Field(2, ge=1, le=64, description="render/encode threads (output does not depend on it)")

    @model_validator(mode="after")
    def _counts_match(self):
        values = self.splits.values()
        if not math.isclose(sum(values), 1.0, abs_tol=1e-6) and sum(values) != self.num_images:
            raise ValueError(f"split counts {self.splits} must sum to num_images={self.num_images}")
        return self


class SyntheticCocoParams(_SyntheticParams):
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "restval": 0.1, "val": 0.1, "test": 0.1},
        description="split -> fraction (sum 1) or image count (sum num_images); Karpathy COCO splits",
    )
    vqa_questions_per_image: int = Field(
        0, ge=0, le=20, description="0: no VQA files; else VQAv2 questions + annotations (v2_OpenEnded_mscoco_*, "
                                    "v2_mscoco_*) about each image's shapes, for train2014 and val2014")
    vqa_answer_noise: float = Field(0.1, ge=0, lt=1, description="chance that an annotator gives another answer")

    @field_validator("splits")
    @classmethod
    def _known_split_names(cls, splits):
        _check_splits(splits)
        unknown = set(splits) - {"train", "restval", "val", "test"}
        if unknown:
            raise ValueError(f"unknown COCO Karpathy split(s) {sorted(unknown)}; use train, restval, val, test")
        return splits


class SyntheticFlickrParams(_SyntheticParams):
    vary_aspect: bool = True
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="split -> fraction (sum 1) or image count (sum num_images)",
    )

    @field_validator("splits")
    @classmethod
    def _known_split_names(cls, splits):
        _check_splits(splits)
        unknown = set(splits) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"unknown Flickr30k split(s) {sorted(unknown)}; use train, val, test")
        return splits


class SyntheticMdetrMixedParams(_SyntheticParams):
    vary_aspect: bool = True
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 1.0},
                                     description="MDETR's mixed data is a training set: train only")
    vg_fraction: float = Field(0.5, ge=0, le=1, description="share of images in gqa/images (data_source vg); the "
                                                             "rest are COCO train2014 images")

    @field_validator("splits")
    @classmethod
    def _train_only(cls, splits):
        _check_splits(splits)
        if set(splits) != {"train"}:
            raise ValueError(f"MDETR's mixed data has a train split only, got {sorted(splits)}")
        return splits


class DownloadFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, LocalFileParam()] = Field(
        description="fsspec URL: http(s)://, s3://, gcs://, file:// or a local path")
    path: str | None = Field(None, description="relative path in the output dir (default: the URL's file name)")
    md5: str | None = None
    sha256: str | None = None
    extract: bool = Field(False, description="extract a .zip/.tar/.tar.gz/.tgz into extract_to after verifying")
    extract_to: str = Field(".", description="relative dir in the output dir to extract into")
    keep_archive: bool = True

    @field_validator("url")
    @classmethod
    def _known_protocol(cls, value):
        import fsspec

        if not value.strip() or any(ord(c) < 32 for c in value):
            raise ValueError("url is empty or contains control characters")
        protocol = value.split("://", 1)[0].lower() if "://" in value else "file"
        if protocol not in fsspec.available_protocols():
            raise ValueError(f"unknown URL protocol {protocol!r} (http, https, s3, gcs, file and the other fsspec "
                             "protocols are known)")
        return value

    @field_validator("path", "extract_to")
    @classmethod
    def _relative_inside(cls, value, info):
        if value is None:
            return value
        if "\x00" in value or "\\" in value:
            raise ValueError(f"{value!r} must be a plain relative path ('/' separators, no NUL)")
        p = PurePosixPath(value)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"{value!r} must be a relative path inside the output dir (no leading '/', no '..')")
        if info.field_name == "path" and not p.parts:  # "", ".", "./"
            raise ValueError(f"{value!r} names the output dir itself; give a file name")
        if p.parts and p.parts[0] in (".staging", "_vlflow"):  # partial downloads; the runner's logs and metrics
            raise ValueError(f"{value!r}: {p.parts[0]}/ is reserved (partial downloads, the runner's bookkeeping)")
        return value

    @field_validator("md5", "sha256")
    @classmethod
    def _hex(cls, value, info):
        if value is not None:
            value = value.strip().lower()
            length = {"md5": 32, "sha256": 64}[info.field_name]
            if len(value) != length or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"{info.field_name} {value!r} is not a {length}-digit hex digest")
        return value

    @property
    def target(self) -> str:
        """The file's normalised path in the output dir (`./p.txt` and `p.txt` are the same target)."""
        from urllib.parse import urlsplit

        url_path = urlsplit(self.url).path if "://" in self.url else self.url.split("?")[0]  # never user:pass@host
        name = self.path or PurePosixPath(url_path.rstrip("/")).name
        return str(PurePosixPath(name)) if name else ""


class DownloadParams(Params):
    files: list[DownloadFile] = Field(min_length=1)
    parallel: int = Field(4, ge=1, le=64)
    retries: int = Field(3, ge=0, le=100, description="extra attempts per file after a dropped connection")
    chunk_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="bytes read per request chunk (held in memory)")
    timeout_s: float = Field(60.0, gt=0, description="socket read timeout")
    low_speed_bytes_per_s: int = Field(
        1024, ge=0, description="an attempt that receives fewer bytes per second than this, averaged over "
                                "low_speed_s, is aborted and retried from where it stopped (curl's --speed-limit); "
                                "0 disables")
    low_speed_s: float = Field(120.0, gt=0, le=86400, description="window of the low-speed check (curl's --speed-time)")
    progress: bool = True
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {s3: {endpoint_url: ...}}; credentials belong in the "
                    "environment, not here (params are part of the cache key and manifest)",
    )

    @model_validator(mode="after")
    def _unique_paths(self):
        from vlflow.secrets import mask

        seen: dict[str, int] = {}
        for index, f in enumerate(self.files):
            target = f.target
            if not target or target in (".", "..") or target.split("/")[0] in (".staging", "_vlflow"):
                raise ValueError(f"files[{index}]: cannot derive a file name from url {mask(f.url)!r}; set `path`")
            if target in seen:
                raise ValueError(f"files[{seen[target]}] and files[{index}] both write {target!r}")
            for other, other_index in seen.items():  # `a` a file and `a/b` another: one path cannot be both
                if target.startswith(other + "/") or other.startswith(target + "/"):
                    raise ValueError(f"files[{other_index}] writes {other!r} and files[{index}] writes {target!r}: "
                                     "one would have to be both a file and a directory")
            seen[target] = index
        return self


class ArrowParams(Params):
    on_bad_image: Literal["skip", "fail"] = "skip"
    image_check: Literal["structure", "decode", "headers"] = Field(
        "structure", description="structure: PIL's verify() of the headers (PNG: chunk CRCs) and a JPEG must end in "
                                 "its end-of-image marker (a truncated JPEG is a bad image), ~0.1 ms vs ~4 ms "
                                 "per JPEG for decode; decode: every image is decoded (also a corrupted middle); "
                                 "headers: verify() only, lets truncated JPEGs through")
    batch_rows: int = Field(256, ge=1, le=100_000, description="rows per Arrow record batch (bounds memory)")
    read_threads: int = Field(4, ge=1, le=64)


class GroundingArrowParams(ArrowParams):
    annotations: Literal["separateGT", "mergedGT"] = "separateGT"
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "val", "test"])


class GroundingMixedArrowParams(ArrowParams):
    annotation_file: str = Field(
        "mdetr_annotations/final_mixed_train.json", description="MDETR's mixed annotations, relative to the root "
        "(UniTAB: final_mixed_train.json; MDETR's final_mixed_train_no_coco.json has the same layout)")
    image_dirs: dict[str, str] = Field(
        default_factory=lambda: {"coco": "train2014", "vg": "gqa/images", "flickr": "flickr30k-images"},
        description="image entry data_source -> image folder relative to the root (UniTAB: coco_path/train2014 and "
                    "vg_img_path = the GQA images)")
    default_source: str = Field("coco", description="data_source of entries without one (MDETR's default)")

    @field_validator("annotation_file", "image_dirs")
    @classmethod
    def _relative_paths(cls, value):
        for path in ([value] if isinstance(value, str) else value.values()):
            parts = PurePosixPath(path).parts
            if not path or path.startswith("/") or ".." in parts or "\\" in path:
                raise ValueError(f"{path!r} must be a relative path inside the root (no leading '/', no '..')")
        return value


class VqaArrowParams(ArrowParams):
    min_answer_count: int = Field(9, ge=1, description="answers that are the majority answer of fewer questions "
                                                       "are not in the vocabulary (ViLT: 9 -> 3,129 answers)")
    rest_val_images: int = Field(1000, ge=0, description="last val images held out as vqav2_rest_val (ViLT: 1000)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the row order (and so which images form rest_val)")
    annotator_answers: Literal["raw", "normalized"] = Field(
        "raw", description="raw: annotators' answers looked up in the vocabulary as given (ViLT); normalized: "
                           "normalised like the vocabulary first ('two' also counts for '2')")


class WebCaptionArrowParams(ArrowParams):
    shard_rows: int = Field(100_000, ge=1, description="rows per shard file (ViLT: 100,000)")


class GccArrowParams(WebCaptionArrowParams):
    splits: list[Literal["train", "val"]] = Field(
        default_factory=lambda: ["train", "val"], min_length=1,
        description="splits to convert (<split>_annot.json + images_<split>/); ViLT's files of a split left out "
                    "are written with 0 rows")


class _SyntheticWebParams(_SyntheticParams):
    """SBU / GCC: one caption per image, and some annotated images missing (their URLs are dead)."""

    captions_per_image: int = Field(1, ge=1, le=1, description="SBU and GCC have one caption per image")
    missing_fraction: float = Field(0.05, ge=0, lt=1, description="share of annotated images whose file is absent "
                                                                  "(dead URLs, as in every real download)")


class SyntheticSbuParams(_SyntheticWebParams):
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 1.0}, description="SBU has train only")

    @field_validator("splits")
    @classmethod
    def _train_only(cls, splits):
        _check_splits(splits)
        if set(splits) != {"train"}:
            raise ValueError("SBU has one split: train")
        return splits


class SyntheticGccParams(_SyntheticWebParams):
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "val": 0.1},
                                     description="split -> fraction (sum 1) or image count (sum num_images)")

    @field_validator("splits")
    @classmethod
    def _known_split_names(cls, splits):
        _check_splits(splits)
        unknown = set(splits) - {"train", "val"}
        if unknown:
            raise ValueError(f"unknown GCC split(s) {sorted(unknown)}; use train, val")
        return splits


class SyntheticVgParams(_SyntheticParams):
    vary_aspect: bool = True
    captions_per_image: int = Field(6, ge=1, le=20, description="region descriptions per image")
    duplicate_fraction: float = Field(0.2, ge=0, le=1, description="chance that an image repeats one phrase for "
                                                                   "another region (common in Visual Genome)")
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 1.0}, description="VG has no splits")

    @field_validator("splits")
    @classmethod
    def _train_only(cls, splits):
        _check_splits(splits)
        if set(splits) != {"train"}:
            raise ValueError("Visual Genome (as ViLT uses it) has one split: train")
        return splits


STAGES = [
    StageSpec(
        name="synthetic.coco",
        entry="vlflow.stages.data.synthetic:coco_stage",
        params=SyntheticCocoParams,
        description="Synthetic shapes dataset in the COCO 2014 + Karpathy layout.",
    ),
    StageSpec(
        name="synthetic.flickr30k",
        entry="vlflow.stages.data.synthetic:flickr30k_stage",
        params=SyntheticFlickrParams,
        description="Synthetic shapes dataset in the Flickr30k + Entities + MDETR-annotations layout.",
    ),
    StageSpec(
        name="synthetic.mdetr_mixed",
        entry="vlflow.stages.data.synthetic:mdetr_mixed_stage",
        params=SyntheticMdetrMixedParams,
        description="Synthetic shapes in the layout of MDETR's mixed grounding data (final_mixed_train.json over "
                    "COCO train2014 + GQA/VG images).",
    ),
    StageSpec(
        name="synthetic.vg",
        entry="vlflow.stages.data.synthetic:vg_stage",
        params=SyntheticVgParams,
        description="Synthetic shapes dataset in the Visual Genome layout (VG_100K*/, region_descriptions.json).",
    ),
    StageSpec(
        name="synthetic.sbu",
        entry="vlflow.stages.data.synthetic:sbu_stage",
        params=SyntheticSbuParams,
        description="Synthetic shapes dataset in ViLT's SBU Captions layout (images_train/*/*, annot.json).",
    ),
    StageSpec(
        name="synthetic.gcc",
        entry="vlflow.stages.data.synthetic:gcc_stage",
        params=SyntheticGccParams,
        description="Synthetic shapes dataset in ViLT's Conceptual Captions layout (images_<split>/*/*, "
                    "<split>_annot.json).",
    ),
    StageSpec(
        name="download",
        entry="vlflow.stages.data.download:download_stage",
        params=DownloadParams,
        resumable=True,  # .part files survive a failed or killed run in the work dir
        description="Downloads files (fsspec) with checksums, HTTP Range resume and safe archive extraction.",
    ),
    StageSpec(
        name="arrow.coco_karpathy",
        entry="vlflow.stages.data.arrow_coco:coco_karpathy_stage",
        params=ArrowParams,
        inputs=("root",),
        description="COCO Karpathy splits -> ViLT arrows (streamed).",
    ),
    StageSpec(
        name="arrow.f30k_karpathy",
        entry="vlflow.stages.data.arrow_f30k:f30k_karpathy_stage",
        params=ArrowParams,
        inputs=("root",),
        description="Flickr30k Karpathy splits -> ViLT arrows (streamed).",
    ),
    StageSpec(
        name="arrow.vqav2",
        entry="vlflow.stages.data.arrow_vqa:vqav2_stage",
        params=VqaArrowParams,
        inputs=("root",),
        optional_inputs=("images",),  # COCO image folders from another stage (e.g. the COCO download)
        description="VQAv2 questions/annotations + COCO images -> ViLT's vqav2 arrows and the answer vocabulary.",
    ),
    StageSpec(
        name="arrow.grounding",
        entry="vlflow.stages.data.arrow_grounding:grounding_stage",
        params=GroundingArrowParams,
        inputs=("root",),
        description="MDETR Flickr30k grounding annotations -> one arrow row per caption with normalised boxes.",
    ),
    StageSpec(
        name="arrow.grounding_mixed",
        entry="vlflow.stages.data.arrow_grounding:grounding_mixed_stage",
        params=GroundingMixedArrowParams,
        inputs=("root",),
        description="MDETR's mixed COCO/VG grounding annotations -> mixed_grounding_train.arrow (the grounding "
                    "columns; UniTAB pretrains on Flickr30k + mixed).",
    ),
    StageSpec(
        name="arrow.vg",
        entry="vlflow.stages.data.arrow_vg:vg_stage",
        params=ArrowParams,
        inputs=("root",),
        description="Visual Genome region descriptions -> ViLT's vg.arrow (streamed).",
    ),
    StageSpec(
        name="arrow.sbu",
        entry="vlflow.stages.data.arrow_webcaps:sbu_stage",
        params=WebCaptionArrowParams,
        inputs=("root",),
        description="SBU Captions (ViLT's layout) -> ViLT's sbu_<i>.arrow shards (streamed).",
    ),
    StageSpec(
        name="arrow.gcc",
        entry="vlflow.stages.data.arrow_webcaps:gcc_stage",
        params=GccArrowParams,
        inputs=("root",),
        description="Google Conceptual Captions (ViLT's layout) -> ViLT's conceptual_caption_<split>_<i>.arrow "
                    "shards (streamed).",
    ),
]
