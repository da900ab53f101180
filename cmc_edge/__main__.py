from cmc_edge.cli import main

raise SystemExit(main())
