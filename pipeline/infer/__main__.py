from pipeline.infer.cli import main

raise SystemExit(main())
