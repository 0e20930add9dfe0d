"""Continual semantic segmentation (SegViT-CL, thesis 4.2.3 and 4.3.6): the workflow of ``segcli cl-step``.

One module a job: ``protocol.py`` (tasks of a protocol), ``presence.py`` (the cached class-presence
index), ``task_data.py`` (the training and evaluation views of a step), ``step.py`` (training one
step), ``step_file.py`` (the per-step record) and ``metrics.py`` (base/new/all mIoU, forgetting).

A recipe with a ``cl:`` section (``protocol: A-B``, ``setting: overlapped | disjoint``) and
``model.type: continual`` is trained one task at a time with :func:`cl_step`; the model is
``segcli/models/continual.py``. Work-dir layout: ``DIR/task{N}/`` holds the usual training files
(``last.pt``, ``best.pt``, ``metrics.jsonl``, ``recipe.yaml``) and ``cl_step.json`` (the per-class
IoU at the end of the step, reused by :func:`cl_metrics`). ``DIR`` defaults to ``runs/<recipe name>``.

Decisions (the thesis is silent; SegViT-CL was not released):

* **Protocol** ``A-B`` on a dataset of K classes: task 1 = class ids ``0..A-1``, then tasks of
  B classes in index order until K; ``(K - A)`` must be a positive multiple of B (ADE20K:
  100-50 = 2 tasks, 100-10 = 6, 50-50 = 3, 100-5 = 11; thesis 4.3.6). Class ids are the
  dataset's after its own label mapping (ADE20K: after ``reduce_zero_label``, so 100-50's base
  classes are the raw labels 1..100, as in MiB/PLOP without their background class).
* **Task images** (thesis 4.3.6, after Cermelli et al. 2020): *overlapped* — every training image
  with at least one pixel of a class of task t; *disjoint* — those of them with no pixel of a
  future task's class. Validation always uses every image.
* **Labels of a training step**: the classes of task t keep their ids, pixels of old and future
  classes become "background" (value 254), ignore stays ignore. Datasets without a background
  class (ADE20K, where raw 0 is already ignored) need a meaning for it: we make it a valid pixel of
  no class, i.e. a negative of every mask of the learning head ("no object" for its queries) rather
  than an ignored pixel. Ignoring those pixels would leave the new masks untrained on old-class
  regions, where at test time they compete with the frozen heads in the concatenated argmax; with
  negatives they learn to stay off them. (``background="ignore"`` in :func:`task_train_dataset`
  gives the other reading, for comparison.)
* **Evaluation at step t**: every validation image with its full labels; the means are over the
  classes learnt so far (tasks 1..t, the "all" of that step) and later classes' IoU is reported
  as None. Pixels of later classes stay valid: whatever the model predicts there is a false
  positive of that class, as in MiB/PLOP, which relabel future classes as a counted background
  at test time. So every step is scored on the same pixels and a base-class IoU changes between
  steps only because the model did (the new head taking pixels from, or giving pixels back to,
  the frozen ones). Ignoring those pixels instead would inflate step 1 and make a "drop" that is
  an artefact of the relabelling.
* **The class-presence index** (which classes each training image contains) is what task
  membership is computed from, for any protocol and setting, with no image decoded twice. It is
  computed once per dataset split (masks read in parallel with ``data.num_workers`` processes)
  and cached in segcli's cache, ``$SEGCLI_CACHE/class_presence/<hash of the root path>/
  class_presence-<split>.npz`` (default ``~/.cache/segcli``), never in the user's dataset (it may be
  read-only, shared, or under version control). When the cache is not writable the index is
  computed and not kept. Invalidation key: a SHA-256 over the class count, the
  dataset's label mapping and, per mask, its path relative to the root, size and modification
  time (ns) — adding, removing, replacing or editing a mask recomputes it; stat-ing 20k files
  costs well under a second.
* **Iterations per step**: task 1 trains the whole model (``train.max_iters``); later tasks train
  one head. The thesis calls them "quick fine-tuning experiments" without numbers; recipes set
  the incremental budget with ``cl.step_iters`` (default: ``train.max_iters``). ``train.init_from``
  applies to task 1 only (later tasks start from task t-1).
* **Metrics** (:func:`cl_metrics`, thesis 4.3.6, tables 4.11-4.12): base mIoU (task-1 classes),
  new mIoU (classes of tasks 2..t), all mIoU (tasks 1..t), avg mIoU (mean of each step's all
  mIoU, Douillard et al. 2021) and forgetting per task (mIoU of its classes at the step that
  learnt it minus at step t; the average, as in table 4.12, is over tasks 2..t). Added:
  ``base_mAcc``, the base classes' mean recall, at every step. A base-class IoU can *rise* after
  a step, because the new head takes pixels of its classes that the old heads had claimed (false
  positives of base classes); the recall depends only on base-class pixels, so its fall is
  exactly the share of them that new heads took: the interference the frozen design leaves.
"""
from .metrics import cl_metrics
from .presence import ClassPresence, class_presence, presence_cache_path
from .protocol import Tasks, parse_protocol, seen_classes
from .step import CLStepResult, cl_step, find_previous_step, step_recipe
from .task_data import (TaskDataset, cl_eval_dataset, task_eval_dataset, task_images, task_train_dataset,
                        train_label_map)

__all__ = ["ClassPresence", "CLStepResult", "TaskDataset", "Tasks", "cl_eval_dataset", "cl_metrics", "cl_step",
           "class_presence", "find_previous_step", "parse_protocol", "presence_cache_path", "seen_classes",
           "step_recipe", "task_eval_dataset", "task_images", "task_train_dataset", "train_label_map"]
