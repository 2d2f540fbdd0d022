# One virtualenv, pinned by constraints.txt, shared by every target.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
MUTATION_INSTALLED := $(VENV)/.mutation-installed
# What `make mutation` mutates (mutmut's mutant names): the DIA modules, the training step's parts, and the settings
# a saved DIA UNet decides.
MUTATION_TARGETS := "dia_diffusion.models.dia_cell.*" "dia_diffusion.models.channel_attention.*" \
	"dia_diffusion.models.dia_resnet.*" "dia_diffusion.models.dia_model.*" "dia_diffusion.models.unet_2d_dia.*" \
	"dia_diffusion.training.step.x_diffusion_loss*" "dia_diffusion.training.tasks.x_random_horizontal_flip*" \
	"dia_diffusion.training.step.x_training_step*" "dia_diffusion.training.step.x_loss_options*" \
	"dia_diffusion.training.step.x_min_snr_weights*" "dia_diffusion.data.captioned_images.*" \
	"dia_diffusion.training.text_to_image_task.xǁTextToImageTaskǁclean_samples*" \
	"dia_diffusion.training.text_to_image_task.xǁTextToImageTaskǁunet_inputs*" \
	"dia_diffusion.training.text_to_image_task.xǁTextToImageTaskǁencoded*" \
	"dia_diffusion.training.initial_weights.x_saved_dia_settings*" "dia_diffusion.training.initial_weights.x_settled*" \
	"dia_diffusion.pipelines.class_conditional.xǁClassSamplingǁ*"

.PHONY: install test demo lint format mutation

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

$(MUTATION_INSTALLED): $(INSTALLED)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test,mutation]"
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q

demo: $(INSTALLED)
	OMP_NUM_THREADS=1 $(VENV)/bin/python train/train_ddpm.py --preset demo --output_dir runs/demo

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Mutation testing (slow; not part of `make test`), see docs/testing.md: each module's score, then every mutant not
# killed. The run's log and the full results stay in mutants/.
mutation: $(MUTATION_INSTALLED)
	mkdir -p mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(MUTATION_TARGETS) > mutants/run.log
	$(VENV)/bin/mutmut results --all true | grep -v ": not checked$$" > mutants/results.txt
	awk '{ split($$1, name, "."); total[name[2]]++; if ($$NF == "killed" || $$NF == "timeout") killed[name[2]]++ } \
		END { for (m in total) printf "%-18s %4d / %4d killed (%.1f %%)\n", m, killed[m], total[m], \
		100 * killed[m] / total[m] }' mutants/results.txt | sort
	grep -v -e ": killed$$" -e ": timeout$$" mutants/results.txt || true
