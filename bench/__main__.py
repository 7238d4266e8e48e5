from alignscan.bench.cli import main

raise SystemExit(main())
