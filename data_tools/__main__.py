from data_tools.cli import main

raise SystemExit(main())
