from p2pstore.cli.main import main

raise SystemExit(main())
