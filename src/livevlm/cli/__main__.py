"""`python -m livevlm.cli …` (what `accelerate launch -m livevlm.cli train …` runs): the `livevlm` command."""

from livevlm.cli import main

main()
