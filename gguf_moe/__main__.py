from gguf_moe.cli import main

main()
